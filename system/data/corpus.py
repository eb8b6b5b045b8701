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

from system.errors import DataError

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


class CorpusNotFoundError(DataError, FileNotFoundError):
    """``data.path`` (or the embedded corpus's standard library folder) does not exist."""


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
        DataError: the text has fewer than 2 characters (a ``ValueError``).
    """
    n = len(text)
    if n < 2:
        raise DataError(f"cannot split a text of {n} characters into train and validation")
    cut = min(max(int(round(n * (1.0 - val_fraction))), 1), n - 1)
    window = max(1, int((n - cut) * _NEWLINE_SEARCH_FRACTION))
    before = text.rfind("\n", max(0, cut - window - 1), cut)  # newline ending at or before cut
    after = text.find("\n", cut - 1, min(n - 1, cut + window))
    candidates = [i + 1 for i in (before, after) if i >= 0 and 1 <= i + 1 <= n - 1]
    if candidates:
        cut = min(candidates, key=lambda c: abs(c - cut))
    return text[:cut], text[cut:]


def _split_docs(
    name: str, keys: list[str], docs: list[str], val_fraction: float, source: str, skipped: str = ""
) -> Corpus:
    """A :class:`Corpus` from documents split by a stable hash of their keys.

    A single document is split by its tail (:func:`split_text_tail`) instead.

    Raises:
        DataError: ``docs`` is empty (``skipped`` says what was left out, naming the files), or a
            single document is shorter than 2 characters.
    """
    if not docs:
        raise DataError(f"corpus {source!r} has no documents" + (f" ({skipped})" if skipped else ""))
    if len(docs) == 1:
        logger.warning("corpus %s has a single document; splitting its tail for validation", source)
        if len(docs[0]) < 2:
            raise DataError(f"corpus {source!r} has a single document of {len(docs[0])} characters ({keys[0]}); "
                            f"at least 2 are needed to split it into train and validation")
        train, val = split_text_tail(docs[0], val_fraction)
        return Corpus(name=name, train_docs=[train], val_docs=[val])
    is_val = split_by_key(keys, val_fraction)
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return Corpus(name=name, train_docs=train, val_docs=val)


# --------------------------------------------------------------------------------------------
# readers


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or ``None`` when it is binary (not UTF-8, or contains NUL bytes).

    Raises:
        DataError: the file cannot be opened or read (permissions, I/O error; the file is named).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"corpus file {str(path)!r} cannot be read: {e.strerror or e}") from None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk_error(e: OSError) -> None:
    raise DataError(f"corpus folder {e.filename!r} cannot be listed: {e.strerror or e}") from None


def _walk_files(root: Path, *, suffix: str | None = None, excluded_dirs: frozenset[str] = frozenset(),
                links: list[str] | None = None) -> list[str]:
    """Relative POSIX paths of the regular files under ``root`` (recursively, sorted, no symlinks).

    Directories named in ``excluded_dirs`` are not descended into; with ``suffix`` only file names
    ending in it are listed. Symbolic links (and dangling ones) are not followed; their relative paths
    are appended to ``links`` when given.

    Raises:
        DataError: a folder under ``root`` cannot be listed (named).
    """
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_walk_error):
        dirnames[:] = [d for d in dirnames if d not in excluded_dirs]
        for fn in filenames:
            if suffix is not None and not fn.endswith(suffix):
                continue
            full = os.path.join(dirpath, fn)
            if os.path.islink(full):
                if links is not None:
                    links.append(Path(os.path.relpath(full, root)).as_posix())
                continue
            if not os.path.isfile(full):
                continue
            rels.append(Path(os.path.relpath(full, root)).as_posix())
    rels.sort()
    return rels


def _read_tree(root: Path, rels: list[str], skipped: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(keys, docs) of the text files ``rels`` under ``root``; binary files are skipped (logged, and
    appended to ``skipped`` when given).

    Raises:
        DataError: a file cannot be opened or read (named).
    """
    keys: list[str] = []
    docs: list[str] = []
    n_skipped = 0
    for rel in rels:
        text = _read_text(root / rel)
        if text is None:
            n_skipped += 1
            if skipped is not None:
                skipped.append(rel)
            logger.debug("skipping non-text file %s", root / rel)
            continue
        keys.append(rel)
        docs.append(text)
    if n_skipped:
        logger.info("skipped %d non-UTF-8/binary files under %s", n_skipped, root)
    return keys, docs


def _describe_skipped(binary: list[str], links: list[str]) -> str:
    """``"skipped 2 non-UTF-8/binary files: a.bin, b.bin; 1 symbolic link: c.txt"`` (first five of each)."""
    def names(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (", ..." if len(xs) > 5 else "")
    parts = []
    if binary:
        parts.append(f"{len(binary)} non-UTF-8/binary file(s): {names(binary)}")
    if links:
        parts.append(f"{len(links)} symbolic link(s), not followed: {names(links)}")
    return "skipped " + "; ".join(parts) if parts else "the folder holds no files"


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
        raise CorpusNotFoundError(f"standard library directory not found: {str(root)!r}")
    keys, docs = _stdlib_files(str(root))
    corpus = _split_docs("stdlib", list(keys), list(docs), val_fraction, source=str(root))
    logger.info(
        "embedded corpus: %d .py files from %s (%d train / %d val)",
        len(docs), root, len(corpus.train_docs), len(corpus.val_docs),
    )
    return corpus


def _load_text_file(path: Path, val_fraction: float) -> Corpus:
    """One text file as one document; its tail is the validation split.

    Raises:
        DataError: the file cannot be read, is not UTF-8 text, or has fewer than 2 characters.
    """
    text = _read_text(path)
    if text is None:
        raise DataError(f"corpus file {str(path)!r} is not UTF-8 text")
    if not text:
        raise DataError(f"corpus file {str(path)!r} is empty: no documents")
    if len(text) < 2:
        raise DataError(f"corpus file {str(path)!r} has {len(text)} character; at least 2 are needed to split "
                        f"it into train and validation")
    train, val = split_text_tail(text, val_fraction)
    return Corpus(name=path.name, train_docs=[train], val_docs=[val])


def _load_directory(path: Path, val_fraction: float) -> Corpus:
    """Every text file under a directory, one document each, split by file.

    Raises:
        DataError: a file or folder cannot be read, or no text file is left (what was skipped is named).
    """
    binary: list[str] = []
    links: list[str] = []
    keys, docs = _read_tree(path, _walk_files(path, links=links), binary)
    if links:
        logger.info("corpus %s: %d symbolic links not followed: %s", path, len(links), ", ".join(links[:5]))
    return _split_docs(path.name, keys, docs, val_fraction, source=str(path),
                       skipped=_describe_skipped(binary, links))


def _load_jsonl(path: Path, val_fraction: float) -> Corpus:
    """One document per line of a JSONL file (its ``"text"`` field), split by line index.

    Blank lines are skipped.

    Raises:
        DataError: the file cannot be read, is not UTF-8, or a line (its 1-based number is named) is
            not JSON, not an object, or has no string ``"text"`` field; no documents.
    """
    keys: list[str] = []
    docs: list[str] = []
    index = -1
    try:
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if line.strip():
                    keys.append(str(index))
                    docs.append(_jsonl_text(path, index + 1, line))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: an invalid byte at or after line {index + 2}") from None
    except OSError as e:
        raise DataError(f"corpus file {str(path)!r} cannot be read: {e.strerror or e}") from None
    return _split_docs(path.name, keys, docs, val_fraction, source=str(path))


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    """The ``"text"`` field of one JSONL line; ``DataError`` naming the file and line otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {lineno} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise DataError(f"{path}: line {lineno} has no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f"{path}: line {lineno} 'text' is {type(text).__name__}, not a string")
    return text


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
        CorpusNotFoundError: ``path`` does not exist, or is a dangling symbolic link (a ``DataError``
            and a ``FileNotFoundError``).
        DataError: ``val_fraction`` out of (0, 1); a file or folder that cannot be read (named); a
            single file that is not UTF-8 text; no documents (what was skipped is named); a JSONL line
            without ``"text"``. A ``DataError`` is also a ``ValueError``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path == "":
        return _load_stdlib(val_fraction)
    p = Path(path).expanduser()
    if not p.exists():
        if p.is_symlink():
            raise CorpusNotFoundError(f"corpus path {path!r} is a symbolic link to {os.readlink(p)!r}, which "
                                      f"does not exist")
        raise CorpusNotFoundError(f"corpus path not found: {path!r} does not exist")
    if not p.is_dir() and not p.is_file():
        raise DataError(f"corpus path {path!r} is neither a file nor a folder")
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
        DataError: the documents contain no bytes (a ``ValueError``).
    """
    counts = np.zeros(256, dtype=np.int64)
    for doc in docs:
        counts += np.bincount(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8), minlength=256)
    total = int(counts.sum())
    if total == 0:
        raise DataError(f"cannot compute the entropy of {len(docs)} documents with 0 bytes")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())
