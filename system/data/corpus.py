"""Corpora: documents of text, split deterministically into training and validation.

A corpus comes from a text file, a directory of text files, a JSONL file with a ``"text"`` field
per line, or (``path == ""``) the embedded default: the ``.py`` sources of the running
interpreter's standard library, which needs no download.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Directory names never descended into by the embedded (standard library) corpus.
STDLIB_EXCLUDED_DIRS: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__"})

#: How far (in characters, as a fraction of the validation size) a text-file split may move to
#: land on a newline.
_NEWLINE_SEARCH_FRACTION = 0.25


@dataclass
class Corpus:
    """Documents of a corpus, split into training and validation.

    Attributes:
        name: short name (``"stdlib"``, or the file/directory name).
        train_docs: training documents (each a ``str``).
        val_docs: validation documents.
    """

    name: str
    train_docs: list[str]
    val_docs: list[str]

    @property
    def train_bytes(self) -> int:
        """Total UTF-8 size of the training documents, in bytes."""
        return sum(len(d.encode("utf-8")) for d in self.train_docs)

    @property
    def val_bytes(self) -> int:
        """Total UTF-8 size of the validation documents, in bytes."""
        return sum(len(d.encode("utf-8")) for d in self.val_docs)

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, train_docs={len(self.train_docs)}, val_docs={len(self.val_docs)})"
        )


# --------------------------------------------------------------------------------------------
# splitting


def stable_unit_hash(key: str) -> float:
    """A deterministic hash of ``key`` in [0, 1) (``zlib.crc32`` of its UTF-8 bytes / 2**32).

    Unlike ``hash()``, it does not change between processes or Python versions.
    """
    return zlib.crc32(key.encode("utf-8")) / 2**32


def split_by_key(keys: list[str], val_fraction: float) -> list[bool]:
    """Which items go to validation: item i does when ``stable_unit_hash(keys[i]) < val_fraction``.

    With at least two items both splits are non-empty: if no item hashed into validation the one
    with the smallest hash goes there, and if all did the one with the largest stays in training.

    Returns:
        ``is_val``, one bool per key.
    """
    scores = [stable_unit_hash(k) for k in keys]
    is_val = [s < val_fraction for s in scores]
    if len(keys) >= 2:
        if not any(is_val):
            is_val[min(range(len(keys)), key=scores.__getitem__)] = True
        if all(is_val):
            is_val[max(range(len(keys)), key=scores.__getitem__)] = False
    return is_val


def split_text_tail(text: str, val_fraction: float) -> tuple[str, str]:
    """Split one text into (train, validation): validation is the last ``val_fraction`` of it.

    The cut moves to just after a newline if one lies within a quarter of the validation size of
    the nominal cut point. Both parts are non-empty.

    Raises:
        ValueError: the text has fewer than 2 characters.
    """
    n = len(text)
    if n < 2:
        raise ValueError(f"cannot split a text of {n} characters into train and validation")
    cut = min(max(int(round(n * (1.0 - val_fraction))), 1), n - 1)
    window = max(1, int((n - cut) * _NEWLINE_SEARCH_FRACTION))
    before = text.rfind("\n", max(0, cut - window - 1), cut)  # newline ending at or before cut
    after = text.find("\n", cut - 1, min(n - 1, cut + window))
    candidates = [i + 1 for i in (before, after) if i >= 0 and 1 <= i + 1 <= n - 1]
    if candidates:
        cut = min(candidates, key=lambda c: abs(c - cut))
    return text[:cut], text[cut:]


def _split_docs(
    name: str, keys: list[str], docs: list[str], val_fraction: float, source: str
) -> Corpus:
    """A :class:`Corpus` from documents split by a stable hash of their keys.

    A single document is split by its tail (:func:`split_text_tail`) instead.

    Raises:
        ValueError: ``docs`` is empty.
    """
    if not docs:
        raise ValueError(f"corpus {source!r} has no documents")
    if len(docs) == 1:
        logger.warning("corpus %s has a single document; splitting its tail for validation", source)
        train, val = split_text_tail(docs[0], val_fraction)
        return Corpus(name=name, train_docs=[train], val_docs=[val])
    is_val = split_by_key(keys, val_fraction)
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return Corpus(name=name, train_docs=train, val_docs=val)


# --------------------------------------------------------------------------------------------
# readers


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or ``None`` when it is binary (not UTF-8, or contains NUL bytes)."""
    data = path.read_bytes()
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk_files(root: Path, *, suffix: str | None = None, excluded_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Relative POSIX paths of the regular files under ``root`` (recursively, sorted, no symlinks).

    Directories named in ``excluded_dirs`` are not descended into; with ``suffix`` only file names
    ending in it are listed.
    """
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in excluded_dirs]
        for fn in filenames:
            if suffix is not None and not fn.endswith(suffix):
                continue
            full = os.path.join(dirpath, fn)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            rels.append(Path(os.path.relpath(full, root)).as_posix())
    rels.sort()
    return rels


def _read_tree(root: Path, rels: list[str]) -> tuple[list[str], list[str]]:
    """(keys, docs) of the text files ``rels`` under ``root``; binary files are skipped (logged)."""
    keys: list[str] = []
    docs: list[str] = []
    skipped = 0
    for rel in rels:
        text = _read_text(root / rel)
        if text is None:
            skipped += 1
            logger.debug("skipping non-text file %s", root / rel)
            continue
        keys.append(rel)
        docs.append(text)
    if skipped:
        logger.info("skipped %d non-UTF-8/binary files under %s", skipped, root)
    return keys, docs


def stdlib_root() -> Path:
    """The running interpreter's standard library directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=2)
def _stdlib_files(root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Cached (keys, docs) of the standard library ``.py`` files under ``root`` (read once per process)."""
    r = Path(root)
    rels = _walk_files(r, suffix=".py", excluded_dirs=STDLIB_EXCLUDED_DIRS)
    keys, docs = _read_tree(r, rels)
    return tuple(keys), tuple(docs)


def _load_stdlib(val_fraction: float) -> Corpus:
    """The embedded corpus: the standard library's ``.py`` sources, split by file."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {str(root)!r}")
    keys, docs = _stdlib_files(str(root))
    corpus = _split_docs("stdlib", list(keys), list(docs), val_fraction, source=str(root))
    logger.info(
        "embedded corpus: %d .py files from %s (%d train / %d val)",
        len(docs), root, len(corpus.train_docs), len(corpus.val_docs),
    )
    return corpus


def _load_text_file(path: Path, val_fraction: float) -> Corpus:
    """One text file as one document; its tail is the validation split."""
    text = _read_text(path)
    if text is None:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text")
    if not text:
        raise ValueError(f"corpus file {str(path)!r} is empty: no documents")
    train, val = split_text_tail(text, val_fraction)
    return Corpus(name=path.name, train_docs=[train], val_docs=[val])


def _load_directory(path: Path, val_fraction: float) -> Corpus:
    """Every text file under a directory, one document each, split by file."""
    keys, docs = _read_tree(path, _walk_files(path))
    return _split_docs(path.name, keys, docs, val_fraction, source=str(path))


def _load_jsonl(path: Path, val_fraction: float) -> Corpus:
    """One document per line of a JSONL file (its ``"text"`` field), split by line index.

    Blank lines are skipped. Raises ``ValueError`` naming the (1-based) line number for a line that
    is not JSON, not an object, or has no string ``"text"`` field.
    """
    keys: list[str] = []
    docs: list[str] = []
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            lineno = index + 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON: {e}") from e
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f"{path}: line {lineno} has no 'text' field")
            text = obj["text"]
            if not isinstance(text, str):
                raise ValueError(f"{path}: line {lineno} 'text' is {type(text).__name__}, not a string")
            keys.append(str(index))
            docs.append(text)
    return _split_docs(path.name, keys, docs, val_fraction, source=str(path))


def load_corpus(path: str, val_fraction: float = 0.02) -> Corpus:
    """Load a corpus and split it into training and validation documents.

    Args:
        path: ``""`` for the embedded standard-library corpus (name ``"stdlib"``); a ``.jsonl`` file
            (one document per line, ``"text"`` field, split by a stable hash of the line index); a
            directory (every UTF-8 text file under it, recursively, one document each, split by a
            stable hash of the relative path; binary files skipped); or any other file (one document,
            its last ``val_fraction`` is validation, cut at a nearby newline).
        val_fraction: fraction of documents (of characters, for a single file) held out, in (0, 1).
            Splits by file put about this fraction of files in validation and at least one in each split.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``val_fraction`` out of (0, 1); no documents; a JSONL line without ``"text"``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path == "":
        return _load_stdlib(val_fraction)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus path not found: {path!r}")
    if p.is_dir():
        corpus = _load_directory(p, val_fraction)
    elif p.suffix.lower() == ".jsonl":
        corpus = _load_jsonl(p, val_fraction)
    else:
        corpus = _load_text_file(p, val_fraction)
    logger.info("corpus %s: %d train / %d val documents", p, len(corpus.train_docs), len(corpus.val_docs))
    return corpus


# --------------------------------------------------------------------------------------------
# statistics


def byte_unigram_entropy(docs: list[str]) -> float:
    """Shannon entropy of the byte histogram of the UTF-8 text of ``docs``, in bits per byte.

    This is the cross-entropy a model that only knows byte frequencies would reach: a useful
    baseline for the loss (in bits) of a byte-level language model.

    Raises:
        ValueError: the documents contain no bytes.
    """
    counts = np.zeros(256, dtype=np.int64)
    for doc in docs:
        counts += np.bincount(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8), minlength=256)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"cannot compute the entropy of {len(docs)} documents with 0 bytes")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
