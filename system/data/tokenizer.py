"""Tokenizers: a byte-level one (no files needed) and a wrapper around Hugging Face ``tokenizer.json``.

Both expose the same small interface used by :func:`system.data.loader.tokenize_docs` and the
trainer: ``name``, ``vocab_size``, ``eos_id``, ``encode``, ``encode_to_array`` and ``decode``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np

from system.errors import DataError

logger = logging.getLogger(__name__)

#: Token names tried, in order, as the end-of-sequence token of a Hugging Face tokenizer.
EOS_TOKEN_NAMES: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>")


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

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as a list of ints in [0, 255] (no EOS appended)."""
        return list(text.encode("utf-8"))

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

    ``eos_id`` is the id of the first of ``<|endoftext|>``, ``</s>``, ``<eos>`` present in the
    vocabulary; if none is, a new id equal to the tokenizer's vocabulary size is reserved for EOS and
    ``vocab_size`` is one larger than the file's.

    Raises:
        TokenizerNotFoundError: ``path`` does not exist or is not a file (a ``DataError`` and a
            ``FileNotFoundError``).
        DataError: the file cannot be read or parsed as a tokenizer (a ``ValueError``; the file is named).
    """

    name: str

    def __init__(self, path: Union[str, Path]) -> None:
        from tokenizers import Tokenizer  # local import: only needed for this tokenizer

        p = Path(path)
        if not p.is_file():
            what = "not found" if not p.exists() else "is not a file"
            raise TokenizerNotFoundError(f"tokenizer file {what}: {str(p)!r} (data.tokenizer is 'byte' or a tokenizer.json)")
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
        self.path = str(p)
        self.name = f"hf:{p}"
        base = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._base_vocab_size = base
        eos: int | None = None
        for tok_name in EOS_TOKEN_NAMES:
            tid = self._tok.token_to_id(tok_name)
            if tid is not None:
                eos = int(tid)
                logger.debug("tokenizer %s: EOS is %r (id %d)", p, tok_name, eos)
                break
        if eos is None:
            eos = base
            logger.info("tokenizer %s has no EOS token %s; using new id %d", p, EOS_TOKEN_NAMES, eos)
            self.vocab_size = base + 1
        else:
            self.vocab_size = max(base, eos + 1)
        self.eos_id = eos
        self._dtype = id_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added, no EOS appended)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array, ``uint16`` if ``vocab_size <= 65535`` else ``int32``."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=self._dtype)

    def encode_batch_to_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode_to_array` of many texts at once (uses the library's parallel batch encoder)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=self._dtype) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of token ids; the EOS id and ids outside the tokenizer's vocabulary are dropped."""
        arr = _ids_to_array(ids)
        keep = (arr >= 0) & (arr < self._base_vocab_size) & (arr != self.eos_id)
        return self._tok.decode([int(i) for i in arr[keep]], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json`` -> :class:`HFTokenizer`.

    Raises:
        DataError: ``spec`` is empty, or the file cannot be read or parsed (see :class:`HFTokenizer`).
        TokenizerNotFoundError: the path does not exist (also a ``FileNotFoundError``).
    """
    s = spec.strip()
    if not s:
        raise DataError("tokenizer spec is empty; use 'byte' or a path to a tokenizer.json")
    if s == "byte":
        return ByteTokenizer()
    return HFTokenizer(s)
