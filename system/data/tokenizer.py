"""Tokenizers: a byte-level one (no files needed) and a wrapper around Hugging Face ``tokenizer.json``.

Both expose the same small interface used by :func:`system.data.loader.tokenize_docs`, the trainer
and the generation engine: ``name``, ``vocab_size``, ``eos_id`` (the document separator),
``eos_ids`` (every id that ends a generation), ``bos_id``, ``encode``, ``encode_to_array``,
``encode_prompt`` (BOS as the model family adds it) and ``decode``.

A Hugging Face model folder (``tokenizer.json`` beside ``config.json``, ``generation_config.json``,
``tokenizer_config.json``) is read by :func:`tokenizer_from_folder`, which takes BOS/EOS from those
files the way ``transformers`` does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from system.errors import DataError

logger = logging.getLogger(__name__)

#: Token names tried, in order, as the end-of-sequence token of a Hugging Face tokenizer whose folder
#: names none (no ``eos_token_id`` in ``generation_config.json``/``config.json``, no ``eos_token``).
EOS_TOKEN_NAMES: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>")

#: The tokenizer file of a Hugging Face model folder.
TOKENIZER_FILE = "tokenizer.json"


def id_dtype(vocab_size: int) -> np.dtype:
    """The numpy dtype for token ids of a vocabulary: ``uint16`` if ``vocab_size <= 65535`` else ``int32``."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def _ids_to_array(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    """Token ids (list, numpy array or torch tensor) as a flat int64 numpy array."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    return arr.reshape(-1)


class TokenizerNotFoundError(DataError, FileNotFoundError):
    """The ``tokenizer.json`` named by ``data.tokenizer`` does not exist."""


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, ``eos_id = 256``; ``vocab_size = 257``."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    eos_ids: tuple[int, ...] = (256,)
    bos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as a list of ints in [0, 255] (no EOS appended)."""
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a generation prompt: the UTF-8 bytes (no BOS); ``[eos_id]`` for an empty prompt."""
        return self.encode(text) or [self.eos_id]

    def encode_to_array(self, text: str) -> np.ndarray:
        """UTF-8 bytes of ``text`` as a 1-D ``uint16`` array of length ``len(text.encode())`` (no EOS)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of byte ids; ids outside [0, 255] (EOS, padding) are dropped; bad UTF-8 becomes U+FFFD."""
        arr = _ids_to_array(ids)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Special ids come from the arguments (:func:`tokenizer_from_folder` reads them from the model
    folder). Without ``eos_ids``, ``eos_id`` is the id of the first of ``<|endoftext|>``, ``</s>``,
    ``<eos>`` present in the vocabulary; if none is, a new id equal to the tokenizer's vocabulary size
    is reserved for EOS and ``vocab_size`` is one larger than the file's. Padding and truncation saved
    in the file are switched off: ids are never padded or cut.

    Prompts (:meth:`encode_prompt`) start with the BOS the model family adds: with ``add_bos`` given
    (``tokenizer_config.json``'s ``add_bos_token``), ``[bos_id]`` or nothing, as ``transformers``
    replaces the file's post-processor then; with ``add_bos=None``, the tokens the file's own
    post-processor puts before the text (e.g. Llama's ``TemplateProcessing``), never those it appends
    after it (a generation prompt does not end in EOS/SEP).

    Args:
        path: the ``tokenizer.json`` file.
        bos_id: the beginning-of-sequence id (``None``: the family has none).
        eos_ids: every id that ends a generation, the first being ``eos_id`` (the document separator
            of training streams); ``None`` or empty: looked up by name as above.
        add_bos: whether prompts start with ``bos_id`` (``None``: as the file's post-processor does).

    Raises:
        TokenizerNotFoundError: ``path`` does not exist or is not a file (a ``DataError`` and a
            ``FileNotFoundError``).
        DataError: the file cannot be read or parsed as a tokenizer (a ``ValueError``; the file is
            named), or a special id is negative.
    """

    name: str

    def __init__(self, path: Union[str, Path], *, bos_id: int | None = None, eos_ids: Sequence[int] | None = None,
                 add_bos: bool | None = None) -> None:
        from tokenizers import Tokenizer  # local import: only needed for this tokenizer

        p = Path(path)
        if not p.is_file():
            what = "not found" if not p.exists() else "is not a file"
            raise TokenizerNotFoundError(f"tokenizer file {what}: {str(p)!r} (data.tokenizer is 'byte', a "
                                         f"tokenizer.json, or a Hugging Face model folder holding one)")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise DataError(f"tokenizer file {str(p)!r} cannot be read: {e.strerror or e}") from None
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"tokenizer file {str(p)!r} is not UTF-8 JSON (byte {e.start}); is it a tokenizer.json?") from None
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"cannot load Hugging Face tokenizer from {str(p)!r}: {e}") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = str(p)
        self.name = f"hf:{p}"
        self._base_vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._set_specials(bos_id, eos_ids, add_bos)

    def _set_specials(self, bos_id: int | None, eos_ids: Sequence[int] | None, add_bos: bool | None) -> None:
        """Set ``bos_id``, ``eos_ids``/``eos_id``, ``vocab_size`` and the prompt prefix (see the class)."""
        base, p = self._base_vocab_size, self.path
        for tid in (bos_id, *(eos_ids or ())):
            if tid is not None and tid < 0:
                raise DataError(f"tokenizer {p!r}: special token id {tid} is negative")
        eos: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids or ()))
        for tok_name in () if eos else EOS_TOKEN_NAMES:
            tid = self._tok.token_to_id(tok_name)
            if tid is not None:
                eos = (int(tid),)
                logger.debug("tokenizer %s: EOS is %r (id %d)", p, tok_name, tid)
                break
        if not eos:
            eos = (base,)
            logger.info("tokenizer %s has no EOS token %s; using new id %d", p, EOS_TOKEN_NAMES, base)
        self.eos_ids: tuple[int, ...] = eos
        self.eos_id = eos[0]
        self.bos_id = None if bos_id is None else int(bos_id)
        self.vocab_size = max(base, max(eos) + 1, (self.bos_id or 0) + 1)
        self._dtype = id_dtype(self.vocab_size)
        if add_bos is None:
            self._prefix = self._post_processor_prefix()
        else:
            if add_bos and self.bos_id is None:
                logger.warning("tokenizer %s: add_bos_token is true but no BOS token is named; prompts get none", p)
            self._prefix = [self.bos_id] if add_bos and self.bos_id is not None else []

    def _post_processor_prefix(self) -> list[int]:
        """The ids the file's post-processor puts before a single text (``[]`` when it adds none)."""
        for probe in ("a", "hello", "0", " ", "."):
            plain = self._tok.encode(probe, add_special_tokens=False).ids
            if not plain:
                continue
            full = self._tok.encode(probe, add_special_tokens=True).ids
            for k in range(len(full) - len(plain) + 1):
                if full[k : k + len(plain)] == plain:
                    return list(full[:k])
        return []

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added, no EOS appended)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a generation prompt (no chat template): the family's BOS prefix, then :meth:`encode`.

        The prefix is not doubled when the text already starts with it (``"<s>Hi"``). An empty
        prompt is the prefix alone, or ``[eos_id]`` when there is no prefix.
        """
        ids = self.encode(text)
        if self._prefix and ids[: len(self._prefix)] != self._prefix:
            ids = self._prefix + ids
        return ids or [self.eos_id]

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array, ``uint16`` if ``vocab_size <= 65535`` else ``int32``."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self._dtype)

    def encode_batch_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode_to_array` of many texts at once (uses the library's parallel batch encoder)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of token ids; the EOS ids and ids outside the tokenizer's vocabulary are dropped."""
        arr = _ids_to_array(ids)
        keep = (arr >= 0) & (arr < self._base_vocab_size) & ~np.isin(arr, self.eos_ids)
        return self._tok.decode([int(i) for i in arr[keep]], skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={list(self.eos_ids)})")


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def _read_json_object(file: Path) -> dict | None:
    """The JSON object in ``file``; ``None`` when there is no such file.

    Raises:
        DataError: the file cannot be read, is not JSON, or holds something other than an object.
    """
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DataError(f"{file} cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{file} holds a JSON {type(data).__name__}, not an object")
    return data


def _config_ids(config: dict | None, key: str, file: Path) -> list[int] | None:
    """``config[key]`` (or ``config["text_config"][key]``) as a list of ids; ``None`` when unset.

    Raises:
        DataError: the value is neither an id, a list of ids, nor null (file and key named).
    """
    if config is None:
        return None
    value = config.get(key)
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise DataError(f"{file}: {key} must be a token id or a list of token ids (>= 0), got {value!r}")
    return [int(v) for v in values]


def _token_id(tok, config: dict | None, key: str, file: Path) -> int | None:
    """The id of ``tokenizer_config.json``'s ``key`` token (a string or ``{"content": ...}``), if known."""
    value = (config or {}).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    tid = tok.token_to_id(value)
    if tid is None:
        logger.warning("%s: %s %r is not in the tokenizer's vocabulary; ignored", file, key, value)
    return tid


def config_token_ids(folder: Path) -> dict[str, list[int] | None]:
    """``{"bos_token_id": ids, "eos_token_id": ids}`` of a Hugging Face model folder, each from the first of
    ``generation_config.json`` and ``config.json`` (top level or ``text_config``) that sets it; ``None``
    when neither does.

    Raises:
        DataError: a file is not a JSON object, or holds a malformed token id (the file and key named).
    """
    files = [folder / "generation_config.json", folder / "config.json"]
    configs = [(_read_json_object(f), f) for f in files]
    return {key: next((ids for c, f in configs if (ids := _config_ids(c, key, f)) is not None), None)
            for key in ("bos_token_id", "eos_token_id")}


def tokenizer_from_folder(path: Union[str, Path]) -> HFTokenizer | None:
    """The tokenizer of a Hugging Face model folder, with its BOS/EOS ids; ``None`` when it has none.

    ``path`` is the folder (its ``tokenizer.json`` is loaded) or a tokenizer file (the files beside it
    are read). BOS and EOS come from, first found: ``generation_config.json``, ``config.json`` (top level
    or ``text_config``; keys ``bos_token_id``, ``eos_token_id``, the latter an id or a list of ids, all
    of which end a generation), then ``tokenizer_config.json`` (``bos_token``/``eos_token`` strings
    mapped to ids). Whether prompts start with BOS: ``tokenizer_config.json``'s ``add_bos_token`` when
    set, else what the tokenizer's own post-processor adds (see :class:`HFTokenizer`). A folder without
    any of these files gets the EOS of :data:`EOS_TOKEN_NAMES` and no BOS. Our own ``config.json``
    (config sections) has none of those keys and is ignored.

    Raises:
        TokenizerNotFoundError: ``path`` does not exist.
        DataError: ``tokenizer.json`` cannot be loaded (see :class:`HFTokenizer`), or one of the
            config files is not a JSON object or holds a malformed token id (the file and key named).
    """
    p = Path(path)
    if p.is_dir():
        folder, file = p, p / TOKENIZER_FILE
        if not file.is_file():
            return None
    elif p.is_file():
        folder, file = p.parent, p
    else:
        raise TokenizerNotFoundError(f"tokenizer path not found: {str(p)!r}")
    tok = HFTokenizer(file)
    tcfg_file = folder / "tokenizer_config.json"
    tcfg = _read_json_object(tcfg_file)
    specials = config_token_ids(folder)
    for key in ("bos_token_id", "eos_token_id"):
        if specials[key] is None:
            tid = _token_id(tok._tok, tcfg, key[: -len("_id")], tcfg_file)
            specials[key] = None if tid is None else [tid]
    add_bos = (tcfg or {}).get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = None
    bos = specials["bos_token_id"]
    tok._set_specials(bos[0] if bos else None, specials["eos_token_id"], add_bos)
    logger.debug("tokenizer %s: bos %s, eos %s", folder, tok.bos_id, tok.eos_ids)
    return tok


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a path to a ``tokenizer.json`` or to a Hugging Face model
    folder holding one -> :class:`HFTokenizer` (with BOS/EOS from the folder: :func:`tokenizer_from_folder`).

    Raises:
        DataError: ``spec`` is empty, or the file cannot be read or parsed (see :class:`HFTokenizer`
            and :func:`tokenizer_from_folder`).
        TokenizerNotFoundError: the path does not exist, or is a folder without ``tokenizer.json``
            (also a ``FileNotFoundError``).
    """
    s = spec.strip()
    if not s:
        raise DataError("tokenizer spec is empty; use 'byte', a path to a tokenizer.json or a model folder")
    if s == "byte":
        return ByteTokenizer()
    p = Path(s)
    if not p.is_dir() and not p.is_file():
        return HFTokenizer(p)  # raises, naming what is wrong with the path
    tok = tokenizer_from_folder(p)
    if tok is None:
        raise TokenizerNotFoundError(f"tokenizer folder {s!r} has no {TOKENIZER_FILE} (data.tokenizer is 'byte', "
                                     f"a tokenizer.json, or a Hugging Face model folder holding one)")
    return tok
