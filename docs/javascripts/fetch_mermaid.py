"""Put the pinned Mermaid library beside the docs, so the site's diagrams render without network access.

Material for MkDocs renders each ```mermaid fence in the browser with mermaid.js. Its loader uses the
global ``mermaid`` when one exists and otherwise loads ``https://unpkg.com/mermaid@11/dist/mermaid.min.js``
(theme bundle: ``typeof mermaid == "undefined" ? <load from unpkg> : <use it>``), so an offline reader
sees the diagram source. ``mkdocs.yml`` lists :data:`SITE_PATH` under ``extra_javascript``: MkDocs emits
it after the theme bundle as a plain ``<script>``, so it has run by ``DOMContentLoaded``, when Material
mounts the diagrams, and the built site then loads nothing from a CDN.

This script makes that file, ``docs/javascripts/vendor/mermaid.min.js`` (git ignores the folder):

1. ``npm pack mermaid@VERSION``: the one package tarball (about 18 MB; no dependencies, nothing
   installed or run) from npm's cache, else from the npm registry, into a temporary folder;
2. its SHA-512 checked against the pinned npm ``integrity`` (:data:`INTEGRITY`);
3. ``package/dist/mermaid.min.js`` (the self-contained IIFE build, about 3.6 MB, which defines
   ``globalThis.mermaid``) and the package's MIT ``LICENSE`` written to :data:`VENDOR`.

A file already there that carries the pinned version is kept (no network). ``make docs`` runs this
first, and stops when it fails. The major version follows Material's loader (``mermaid@11``), whose
diagram styling targets it. To move the pin: ``npm view mermaid@11 version`` for the newest, then
``npm view mermaid@<version> dist.integrity`` for :data:`INTEGRITY`.

Exit status 1, with one line on stderr naming the cause, when npm is missing, the registry cannot be
reached, or the tarball is not the pinned one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11.17.2"
"""The pinned ``mermaid`` npm version."""
INTEGRITY = "sha512-V6K3C8EBdEsPFZXSKMJe6ppQOENxuHARr9GvHX4hh47lAbhMRD9qf4oEK7LoaRQxULMa80/qt5gHO73aCleBBg=="
"""``npm view mermaid@VERSION dist.integrity``: the SHA-512 of the registry tarball (Subresource Integrity form)."""

VENDOR = Path(__file__).resolve().parent / "vendor"
SITE_PATH = "javascripts/vendor/mermaid.min.js"
"""Where the library lies in the docs and in the built site (``extra_javascript`` in mkdocs.yml)."""
BUNDLE = VENDOR / "mermaid.min.js"
LICENSE = VENDOR / "mermaid.LICENSE.txt"

VERSION_MARK = f'version:"{VERSION}"'.encode()
"""The version record inside the minified build (``{version:"11.17.2"}``, read by ``mermaid.version``)."""
GLOBAL_MARK = b'globalThis["mermaid"]'
"""The build's last statement, which defines the global Material looks for (absent when truncated)."""

log = logging.getLogger("fetch_mermaid")


class MermaidUnavailable(RuntimeError):
    """npm is missing or could not fetch the package (no network, registry down): nothing was checked."""


class MermaidIntegrityError(RuntimeError):
    """The fetched package is not the pinned one: wrong hash, or not the expected Mermaid build."""


def _is_build(data: bytes) -> bool:
    return VERSION_MARK in data and GLOBAL_MARK in data[-4096:]


def is_valid(path: Path = BUNDLE) -> bool:
    """Whether ``path`` is a complete ``mermaid.min.js`` of :data:`VERSION`."""
    return path.is_file() and _is_build(path.read_bytes())


def _sri_sha512(path: Path) -> str:
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_error(proc: subprocess.CompletedProcess) -> str:
    """npm's own one-line account of a failure: ``EAI_AGAIN: request to ... failed``."""
    try:
        err = json.loads(proc.stdout)["error"]
        return f"{err['code']}: {err['summary']}"
    except (ValueError, KeyError, TypeError):
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        return lines[0] if lines else f"exit status {proc.returncode}"


def _npm_pack(dest: Path, timeout_s: float, retries: int | None) -> Path:
    """``npm pack mermaid@VERSION`` into ``dest``; returns the tarball. Raises :class:`MermaidUnavailable`.

    ``--prefer-offline``: a tarball already in npm's cache is used without asking the registry (the
    pinned integrity is checked either way).
    """
    npm = shutil.which("npm")
    if npm is None:
        raise MermaidUnavailable("npm not found on PATH: install Node.js (npm) to fetch the Mermaid library")
    cmd = [npm, "pack", f"mermaid@{VERSION}", "--json", "--ignore-scripts", "--prefer-offline",
           "--pack-destination", str(dest)]
    if retries is not None:
        cmd.append(f"--fetch-retries={retries}")
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise MermaidUnavailable(f"npm pack mermaid@{VERSION} did not finish in {timeout_s:.0f} s") from e
    if proc.returncode != 0:
        raise MermaidUnavailable(f"npm pack mermaid@{VERSION} failed: {_npm_error(proc)}")
    return dest / json.loads(proc.stdout)[0]["filename"]


def fetch(*, timeout_s: float = 300.0, retries: int | None = None) -> Path:
    """Make :data:`BUNDLE` the pinned Mermaid build, fetching it only when it is missing or another version.

    Args:
        timeout_s: wall-clock limit for ``npm pack``, in seconds.
        retries: npm's ``fetch-retries`` (``None``: npm's setting, 2 by default; offline, each retry
            waits for the name lookup again, minutes in all, so a caller that must fail fast passes 0).

    Returns:
        :data:`BUNDLE`, a file of about 3.6 MB.

    Raises:
        MermaidUnavailable: npm is missing, or ``npm pack`` failed or ran past ``timeout_s`` seconds.
        MermaidIntegrityError: the tarball's SHA-512 differs from :data:`INTEGRITY`, or it lacks a
            complete ``dist/mermaid.min.js`` of :data:`VERSION`.
    """
    if is_valid():
        log.info("mermaid %s already at %s", VERSION, BUNDLE)
        return BUNDLE
    with tempfile.TemporaryDirectory(prefix="mermaid-") as tmp:
        tarball = _npm_pack(Path(tmp), timeout_s, retries)
        got = _sri_sha512(tarball)
        if got != INTEGRITY:
            raise MermaidIntegrityError(f"{tarball.name}: integrity {got} differs from the pinned {INTEGRITY}")
        with tarfile.open(tarball, "r:gz") as tar:
            try:
                members = {dst: tar.extractfile(tar.getmember(src)).read()  # type: ignore[union-attr]
                           for src, dst in (("package/LICENSE", LICENSE), ("package/dist/mermaid.min.js", BUNDLE))}
            except KeyError as e:
                raise MermaidIntegrityError(f"{tarball.name}: {e.args[0]}") from e
    if not _is_build(members[BUNDLE]):
        raise MermaidIntegrityError(f"{tarball.name}: dist/mermaid.min.js is not a complete build of {VERSION}")
    VENDOR.mkdir(parents=True, exist_ok=True)
    for dst, data in members.items():  # written beside, then renamed: never half a file; the bundle last
        part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, dst)
    log.info("mermaid %s (%d bytes) written to %s", VERSION, BUNDLE.stat().st_size, BUNDLE)
    return BUNDLE


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fetch()
    except (MermaidUnavailable, MermaidIntegrityError) as e:
        print(f"error: Mermaid library for the docs diagrams: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
