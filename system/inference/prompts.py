"""Generation prompts: the model folder's tokenizer, text or token-id prompts, and their checks.

A prompt is text (encoded with the model's tokenizer, BOS as its family adds it:
:meth:`system.data.tokenizer.HFTokenizer.encode_prompt`) or a sequence of token ids (``moesys
generate --prompt-ids 1,5,9``), which needs no tokenizer. Every check here runs before any model
weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from system.config.loader import ConfigError
from system.data.tokenizer import Tokenizer, TokenizerNotFoundError, build_tokenizer, tokenizer_from_folder
from system.errors import DataError
from system.inference.plan import PlanError

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[int]]
"""Text, or token ids."""

NO_TOKENIZER = ("", "none")
"""``data.tokenizer`` values that mean the model has no tokenizer (prompts must be token ids)."""


def parse_prompt_ids(text: str) -> list[int]:
    """Token ids written as ``"1,5,9"`` (spaces allowed) -> ``[1, 5, 9]``; the range is checked later
    (:func:`encode_prompts`, which knows the vocabulary size).

    Raises:
        PlanError: no id, or an item that is not a non-negative integer (the item is named).
    """
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise PlanError(f"--prompt-ids {text!r} has no token id: give ids like 1,5,9")
    ids = []
    for item in items:
        if not item.lstrip("-").isdigit():
            raise PlanError(f"--prompt-ids {text!r}: {item!r} is not a token id (an integer; ids look like 1,5,9)")
        ids.append(int(item))
    return ids


def resolve_tokenizer(checkpoint_dir: str | Path, spec: str, *, required: bool = True) -> Tokenizer | None:
    """The tokenizer of a saved model; ``None`` when it has none.

    In order: the model folder's own ``tokenizer.json`` with its BOS/EOS
    (:func:`system.data.tokenizer.tokenizer_from_folder`; a Hugging Face checkpoint folder needs no
    job config); none when ``spec`` (the saved ``data.tokenizer``) is ``""`` or ``"none"``; else
    :func:`system.data.tokenizer.build_tokenizer` of ``spec``.

    Args:
        checkpoint_dir: the model folder.
        spec: the saved ``data.tokenizer``.
        required: ``False`` when every prompt is token ids: a tokenizer file that is gone is then
            reported as a warning and ``None`` is returned.

    Raises:
        TokenizerNotFoundError: ``spec`` names a path that does not exist (and ``required``).
        DataError: a tokenizer or one of its config files cannot be loaded.
    """
    tok = tokenizer_from_folder(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
    if tok is not None:
        logger.info("tokenizer: %s (bos %s, eos %s)", tok.path, tok.bos_id, list(tok.eos_ids))
        return tok
    if spec.strip().lower() in NO_TOKENIZER:
        return None
    try:
        return build_tokenizer(spec)
    except TokenizerNotFoundError as e:
        if required:
            raise
        logger.warning("no tokenizer, generated ids are not decoded: %s", e)
        return None


def model_vocab_size(vocab_size: int, tokenizer: Tokenizer | None) -> int:
    """The model's vocabulary size: ``vocab_size``, or with ``0`` the tokenizer's rounded up to a
    multiple of 64 (as training sizes it).

    Raises:
        ConfigError: ``vocab_size`` is 0 and there is no tokenizer to take it from.
    """
    if vocab_size:
        return vocab_size
    if tokenizer is None:
        raise ConfigError("model.vocab_size is 0 (take the tokenizer's) but the model has no tokenizer")
    return -(-tokenizer.vocab_size // 64) * 64


def encode_prompts(prompts: Sequence[Prompt], tokenizer: Tokenizer | None, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt: text through ``tokenizer.encode_prompt``, ids as given, all checked.

    Args:
        prompts: text or token ids, one entry per prompt.
        tokenizer: the model's tokenizer (``None``: every prompt must be ids).
        vocab_size: the model's vocabulary size; every id must be in ``[0, vocab_size)``.

    Returns:
        One non-empty list of ids per prompt, in order.

    Raises:
        DataError: a text prompt and no tokenizer.
        PlanError: an empty id prompt, an id that is not an integer, or an id outside
            ``[0, vocab_size)`` (the prompt, the id and the vocabulary size are named).
    """
    out = []
    for n, prompt in enumerate(prompts, 1):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise DataError(f"prompt {n} is text but the model has no tokenizer (no tokenizer.json in its "
                                f"folder, data.tokenizer unset): give token ids with --prompt-ids 1,5,9")
            ids, what = tokenizer.encode_prompt(prompt), "encodes to"
        else:
            ids, what = list(prompt), "has"
            if not ids:
                raise PlanError(f"prompt {n} has no token ids")
            bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool)), None)
            if bad is not None:
                raise PlanError(f"prompt {n}: token id {bad!r} is not an integer")
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            hint = "" if what == "has" else " (the tokenizer does not match the model)"
            raise PlanError(f"prompt {n} {what} token id {bad}: outside [0, vocab_size) for the model's "
                            f"vocab_size {vocab_size}{hint}")
        out.append([int(i) for i in ids])
    return out
