"""Storage through fsspec, the commit protocol, and the ``latest`` pointer (ByteCheckpoint section 4.3).

Any fsspec URL works (local paths by default, ``memory://`` in tests, object stores given their
package). The protocol does not rely on an atomic directory rename, which object stores lack:

1. every writing rank writes its data file (and fsyncs it on a local file system);
2. barrier on the checkpoint group;
3. rank 0 writes ``metadata.json`` last: on a local FS to a temporary name, fsync, ``os.replace``,
   fsync of the directory; elsewhere as one ``put`` of the whole file.

A directory is *committed* iff its ``metadata.json`` exists and parses. ``root/latest`` (text: the
name of a step directory) is replaced atomically, only after that step committed, so a crash at any
moment leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from system.checkpoint.errors import (
    CheckpointError, CheckpointNotFoundError, DataFileError, UncommittedCheckpointError,
)
from system.checkpoint.metadata import METADATA_FILE, CheckpointMetadata

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
WRITE_CHUNK_BYTES = 64 << 20
"""Data files are written (and their writeback started) in pieces of this size on a local FS."""
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``12`` -> ``"step_00000012"``."""
    return f"step_{step:08d}"


class Storage:
    """A directory on an fsspec file system.

    Args:
        url: local path or fsspec URL (``memory://ckpt/step_00000001``).
        storage_options: keyword arguments for the fsspec file system.
    """

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/") or "/"

    def path(self, name: str) -> str:
        """File system path of ``name`` inside the directory."""
        return os.path.join(self.root, name) if self.is_local else f"{self.root}/{name}"

    def child(self, name: str) -> Storage:
        """A :class:`Storage` for a sub-directory sharing this file system."""
        s = object.__new__(Storage)
        s.url, s.fs, s.is_local = f"{self.url.rstrip('/')}/{name}", self.fs, self.is_local
        s.root = self.path(name)
        return s

    def makedirs(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        """Size of ``name`` in bytes; raises :class:`DataFileError` when it does not exist."""
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError as e:
            raise DataFileError(f"data file {self.path(name)} is missing") from e

    def write_file(self, name: str, buffers: Iterable[memoryview]) -> int:
        """Write the concatenation of ``buffers`` to ``name`` (fsynced on a local FS); returns bytes written.

        On a local FS the bytes go out in :data:`WRITE_CHUNK_BYTES` pieces and each piece's writeback is
        started at once (``posix_fadvise(DONTNEED)`` starts asynchronous writeback of dirty pages, then
        drops the clean ones), so the disk works while the rest is copied into the page cache, the final
        ``fsync`` only waits for the tail, no multi-GB burst of dirty pages hits the kernel's dirty
        throttling, and a checkpoint does not fill the page cache. Durability still comes from the fsync.
        """
        n = 0
        if self.is_local:
            advise = getattr(os, "posix_fadvise", None)
            with open(self.path(name), "wb", buffering=0) as f:
                fd = f.fileno()
                for b in buffers:
                    b = memoryview(b).cast("B")
                    done = 0
                    while done < len(b):
                        k = f.write(b[done : done + WRITE_CHUNK_BYTES])
                        if advise is not None:
                            advise(fd, n, k, os.POSIX_FADV_DONTNEED)  # start writing this piece back
                            if n > WRITE_CHUNK_BYTES:  # drop what was written back by now (best effort)
                                advise(fd, 0, n - WRITE_CHUNK_BYTES, os.POSIX_FADV_DONTNEED)
                        done += k
                        n += k
                os.fsync(fd)
        else:
            with self.fs.open(self.path(name), "wb") as f:
                for b in buffers:
                    f.write(b)
                    n += len(b)
        return n

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace ``name`` with ``data`` so that readers see the old or the new file, never a mix."""
        if self.is_local:
            tmp = self.path(f".{name}.tmp.{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(name))
            fsync_path(self.root)
        else:
            self.fs.pipe_file(self.path(name), data)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name))

    def remove_tree(self) -> None:
        """Delete the directory: ``metadata.json`` first, so a half-finished delete is uncommitted, not corrupt."""
        self.remove(METADATA_FILE)
        self.fs.rm(self.root, recursive=True)


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a local file or folder by path (a folder: so that renames and new entries in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_umask(folder: str | os.PathLike) -> None:
    """Give ``folder`` and its files the modes a plain ``mkdir``/``open`` would have (0777/0666 less the umask).

    ``tempfile.mkdtemp`` makes its folder 0700 (and some writers make their files 0600); a folder built
    under a temporary name and renamed into place must not stay private to its writer.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~umask)
        elif f.is_dir() and not f.is_symlink():
            os.chmod(f, 0o777 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def swap_in_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Replace the local folder ``path`` by the folder ``new`` (a sibling on the same file system).

    The old folder is renamed to a unique hidden sibling (``.<name>.old-XXXX``), ``new`` renamed to
    ``path`` (the old one is renamed back if that fails), then the old one is deleted. ``path`` is
    never a mix of old and new files; a crash between the two renames leaves the old folder intact
    under its hidden name. The caller decides that ``path`` may be replaced.

    Raises:
        OSError: a rename failed (``path`` is then as it was).
    """
    new, path = Path(new), Path(path)
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    try:
        os.rename(path, old)  # onto the empty folder mkdtemp made: atomic
    except BaseException:
        os.rmdir(old)
        raise
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


class RangeReader:
    """Positional reads of byte ranges of a directory's files, safe to call from many threads.

    On a local FS each file is opened once and read with ``os.preadv`` straight into the caller's
    buffer; elsewhere ``fs.cat_file(path, start, end)`` is copied into it.
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = os.open(self.storage.path(name), os.O_RDONLY)
                except FileNotFoundError as e:
                    raise DataFileError(f"data file {self.storage.path(name)} is missing") from e
                self._fds[name] = fd
            return fd

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` (a writable byte buffer) with ``name[offset : offset + len(out)]``.

        Raises:
            DataFileError: the file is missing or ends before ``offset + len(out)`` (truncated).
        """
        want = len(out)
        if self.storage.is_local:
            fd, done = self._fd(name), 0
            while done < want:
                n = os.preadv(fd, [out[done:]], offset + done)
                if n <= 0:
                    break
                done += n
        else:
            try:
                data = self.storage.fs.cat_file(self.storage.path(name), start=offset, end=offset + want)
            except FileNotFoundError as e:
                raise DataFileError(f"data file {self.storage.path(name)} is missing") from e
            done = len(data)
            out[:done] = data
        if done < want:
            raise DataFileError(
                f"data file {self.storage.path(name)} is truncated: needed bytes [{offset}, {offset + want}), "
                f"file ends at byte {offset + done}"
            )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_metadata(storage: Storage) -> CheckpointMetadata:
    """Parse ``metadata.json`` of a checkpoint directory.

    Raises:
        CheckpointNotFoundError: the directory does not exist.
        UncommittedCheckpointError: the directory has no (readable, parsable) ``metadata.json``.
        FormatVersionError: unknown format version (a newer one is named as such).
    """
    where = storage.path(METADATA_FILE)
    try:
        text = storage.read_bytes(METADATA_FILE)
    except FileNotFoundError as e:
        if not storage.fs.exists(storage.root):
            raise CheckpointNotFoundError(f"checkpoint {storage.url} does not exist") from e
        raise UncommittedCheckpointError(
            f"{storage.url} is not a committed checkpoint: {where} is missing (the save did not finish)"
        ) from e
    except OSError as e:  # a folder named metadata.json, no permission, ...
        raise UncommittedCheckpointError(f"cannot read {where}: {e}") from e
    return CheckpointMetadata.from_json(text, where)


def is_committed(storage: Storage) -> bool:
    """True iff the directory's ``metadata.json`` exists and parses."""
    try:
        read_metadata(storage)
    except CheckpointError:
        return False
    return True


def commit_latest(root: str | os.PathLike, name: str, *, storage_options: dict | None = None) -> None:
    """Point ``root/latest`` at the step directory ``name`` (atomic replace).

    Raises:
        UncommittedCheckpointError: ``root/name`` is not committed (``latest`` is left unchanged).
    """
    store = Storage(root, storage_options)
    read_metadata(store.child(name))
    store.write_atomic(LATEST_FILE, name.encode())
    logger.info("checkpoint: %s/%s now points to %s", store.url, LATEST_FILE, name)


def read_latest(root: str | os.PathLike, *, storage_options: dict | None = None) -> str | None:
    """The step directory name ``root/latest`` points to, or None when there is no ``latest``."""
    store = Storage(root, storage_options)
    if not store.exists(LATEST_FILE):
        return None
    return store.read_bytes(LATEST_FILE).decode().strip()


def resolve_checkpoint(path: str | os.PathLike, *, storage_options: dict | None = None) -> str:
    """The URL of a committed checkpoint directory named by ``path``.

    ``path`` may be a checkpoint directory, a root holding a ``latest`` file, or that ``latest`` file.

    Raises:
        CheckpointNotFoundError: ``path`` (or the directory ``latest`` names) does not exist (a
            subclass of :class:`UncommittedCheckpointError`).
        UncommittedCheckpointError: the directory (or the one ``latest`` names) is not committed, or
            ``path`` is neither a checkpoint nor a root with ``latest``.
        FormatVersionError: the checkpoint was written in another format version.
    """
    url = os.fspath(path).rstrip("/")
    store = Storage(url, storage_options)
    if store.exists(METADATA_FILE):
        read_metadata(store)
        return store.url
    if url.endswith("/" + LATEST_FILE) or url == LATEST_FILE:
        root = url[: -len(LATEST_FILE)].rstrip("/") or "."
        store = Storage(root, storage_options)
    if not store.fs.exists(store.root):
        raise CheckpointNotFoundError(f"checkpoint {url} does not exist")
    if store.fs.isfile(store.root):
        raise UncommittedCheckpointError(f"{url} is a file, not a checkpoint folder (nor a root holding '{LATEST_FILE}')")
    try:
        name = read_latest(store.url, storage_options=storage_options)
    except UnicodeDecodeError:
        raise UncommittedCheckpointError(f"{store.path(LATEST_FILE)} is not a text file naming a checkpoint") from None
    if name is None:
        raise UncommittedCheckpointError(
            f"{url} is not a committed checkpoint: {store.path(METADATA_FILE)} is missing (the save did not "
            f"finish, or this is not a checkpoint) and there is no '{LATEST_FILE}' file"
        )
    target = store.child(name)
    if not name or "/" in name or not store.fs.exists(target.root):
        raise CheckpointNotFoundError(
            f"{store.path(LATEST_FILE)} names checkpoint {name!r}, but {target.url} does not exist"
        )
    read_metadata(target)
    return target.url


def list_checkpoints(root: str | os.PathLike, *, storage_options: dict | None = None) -> list[str]:
    """URLs of the committed ``step_*`` directories under ``root``, oldest step first (uncommitted ones skipped)."""
    store = Storage(root, storage_options)
    if not store.fs.exists(store.root):
        return []
    steps = []
    for entry in store.fs.ls(store.root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = _STEP_RE.match(name)
        if m and is_committed(store.child(name)):
            steps.append((int(m.group(1)), name))
    return [store.child(name).url for _, name in sorted(steps)]


def prune(root: str | os.PathLike, keep_last: int, *, storage_options: dict | None = None) -> list[str]:
    """Delete committed step directories beyond the newest ``keep_last``; returns the deleted URLs.

    The directory ``latest`` points at is never deleted, and uncommitted directories (possibly a save
    still in progress) are left alone.

    Raises:
        ValueError: ``keep_last < 1``.
    """
    if keep_last < 1:
        raise ValueError(f"prune keeps at least one checkpoint, got keep_last={keep_last}")
    store = Storage(root, storage_options)
    latest = read_latest(root, storage_options=storage_options)
    deleted = []
    for url in list_checkpoints(root, storage_options=storage_options)[:-keep_last]:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name == latest:
            continue
        store.child(name).remove_tree()
        deleted.append(url)
        logger.info("checkpoint: pruned %s", url)
    return deleted
