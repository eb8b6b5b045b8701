"""The documentation's Mermaid diagrams render for a reader without network access.

Material for MkDocs draws each ```mermaid fence in the browser with mermaid.js, loaded from unpkg.com
unless a global ``mermaid`` exists; ``make docs`` puts the pinned library in the site
(``docs/javascripts/fetch_mermaid.py``, ``extra_javascript`` in mkdocs.yml). Checked here, on a fresh
``mkdocs build --strict``:

- the library in the built site is the pinned Mermaid build (size, version record, same bytes);
- every page with a diagram, including those from new ```mermaid fences anywhere under docs/, loads
  scripts only from the site itself, the local library among them, and names no remote Mermaid;
- when a Chromium is installed: each such page, opened from ``file://`` with every host name
  unresolvable, shows one Mermaid ``<svg>`` per diagram (so a diagram with a syntax error fails too)
  and never adds a remote ``<script>`` (Material's CDN fallback).

The library is fetched with npm once (then kept, git-ignored); without npm or the registry, the tests
skip and say why.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.docs_site import build_site

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FETCHER = DOCS / "javascripts" / "fetch_mermaid.py"
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*mermaid\b", re.M)
DIAGRAM = re.compile(r'<(pre|div) class="mermaid">(.*?)</\1>', re.S)
SCRIPT_SRC = re.compile(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", re.I)
REMOTE = re.compile(r"^([a-z][a-z0-9+.-]*:|//)", re.I)
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
VIRTUAL_TIME_MS = 20_000  # page time Chromium lets pass (virtual: no real wait) before the DOM is read

# Injected first in <head> of a copy of a page. Material attaches each diagram in a *closed* shadow
# root; opening it lets the probe see the <svg>. The probe writes what it sees, as JSON, into a <pre>
# that --dump-dom prints: the rendered SVGs (a diagram Mermaid cannot parse gets none; its message is
# hidden, file:// scripts being cross-origin), Mermaid scripts that failed to load, and any <script>
# with a remote source (Material's fallback to unpkg.com).
PROBE_JS = """
(() => {
  const attach = Element.prototype.attachShadow;
  Element.prototype.attachShadow = function (init) { return attach.call(this, { ...init, mode: "open" }); };
  const failedScripts = [];
  addEventListener("error", (e) => {
    const src = e.target && e.target.tagName === "SCRIPT" && e.target.getAttribute("src");
    if (src && /mermaid/i.test(src)) failedScripts.push(src);  // search_index.js fails from file:// too
  }, true);
  const report = () => {
    if (!document.body) return;
    let out = document.getElementById("diagram-probe");
    if (!out) { out = document.createElement("pre"); out.id = "diagram-probe"; document.body.append(out); }
    const svgs = [...document.querySelectorAll("div.mermaid")]
      .map((host) => host.shadowRoot && host.shadowRoot.querySelector("svg")).filter(Boolean)
      .map((svg) => ({
        id: svg.id, type: svg.getAttribute("aria-roledescription"), width: svg.getBoundingClientRect().width,
        labels: [...svg.querySelectorAll("text, foreignObject")].map((t) => t.textContent.trim()).filter(Boolean),
      }));
    const remote = [...document.querySelectorAll("script[src]")].map((s) => s.getAttribute("src"))
      .filter((src) => /^([a-z][a-z0-9+.-]*:|\\/\\/)/i.test(src));
    out.textContent = JSON.stringify({ svgs, failedScripts, remote, mermaid: typeof mermaid });
  };
  setInterval(report, 100);
})();
"""


def _load_fetcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fetch_mermaid", FETCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fetcher() -> ModuleType:
    module = _load_fetcher()
    try:  # kept from an earlier run or `make docs`: no network; else npm, failing fast when offline
        module.fetch(timeout_s=60, retries=0)
    except module.MermaidUnavailable as e:
        pytest.skip(f"the Mermaid library for the docs cannot be fetched ({e}); `make docs` needs npm and "
                    "the npm registry once")
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory, fetcher) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


def _built_page(site: Path, md: Path) -> Path:
    """The HTML that ``use_directory_urls`` makes of ``docs/<md>``: ``a/b.md`` -> ``a/b/index.html``."""
    rel = md.relative_to(DOCS).with_suffix("")
    return site / (rel.parent if rel.name in ("index", "README") else rel) / "index.html"


def _diagram_pages(site: Path) -> dict[Path, list[str]]:
    """``{built page: [diagram source, ...]}`` for every page with a diagram; checked against docs/."""
    pages = {}
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        sources = [html.unescape(re.sub(r"<[^>]+>", "", m.group(2))) for m in DIAGRAM.finditer(text)]
        if sources:
            pages[page] = sources
    written = [md for md in sorted(DOCS.rglob("*.md")) if FENCE.search(md.read_text(encoding="utf-8"))]
    assert written, "no ```mermaid fence under docs/: this test lost its subject"
    for md in written:
        assert _built_page(site, md) in pages, f"{md.relative_to(ROOT)} has a ```mermaid fence; its page has no diagram"
    return pages


def test_site_carries_the_pinned_mermaid(site: Path, fetcher: ModuleType) -> None:
    bundle = site / fetcher.SITE_PATH
    assert bundle.is_file(), f"{fetcher.SITE_PATH} missing from the built site"
    data = bundle.read_bytes()
    assert 1_000_000 < len(data) < 20_000_000, f"{bundle.name} is {len(data)} bytes: not the Mermaid build"
    assert fetcher.VERSION_MARK in data, f"{bundle.name} does not carry Mermaid {fetcher.VERSION}"
    assert data.rstrip().endswith(b'globalThis["mermaid"] = globalThis.__esbuild_esm_mermaid_nm["mermaid"].default;'), \
        f"{bundle.name} does not end by defining the global mermaid Material looks for"
    assert data == fetcher.BUNDLE.read_bytes()
    assert "MIT License" in (bundle.parent / fetcher.LICENSE.name).read_text(encoding="utf-8")


def test_diagram_pages_load_mermaid_from_the_site(site: Path, fetcher: ModuleType) -> None:
    bundle = (site / fetcher.SITE_PATH).resolve()
    for page in _diagram_pages(site):
        name = page.relative_to(site)
        text = page.read_text(encoding="utf-8")
        srcs = SCRIPT_SRC.findall(text)
        remote = [s for s in srcs if REMOTE.match(s)]
        assert not remote, f"{name} loads remote scripts: {remote}"
        assert bundle in [(page.parent / s).resolve() for s in srcs], f"{name} does not load {fetcher.SITE_PATH}"
        named = re.findall(r"(?:https?:)?//[^\s\"'<>]*mermaid[^\s\"'<>]*", text, flags=re.I)
        assert not named, f"{name} names a remote Mermaid: {named}"


def _chromium() -> str | None:
    return next((exe for exe in map(shutil.which, CHROMIUMS) if exe), None)


def _render_offline(exe: str, page: Path, tmp_path: Path) -> dict:
    """What the probe saw in ``page`` opened from ``file://`` with no name resolving (no network)."""
    probe = page.with_name("diagram-probe.html")  # beside the page: its relative links still resolve
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    probe.write_text(text[: head.end()] + f"<script>{PROBE_JS}</script>" + text[head.end():], encoding="utf-8")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--proxy-server=http://127.0.0.1:9", f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom",
           probe.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    m = re.search(r'<pre id="diagram-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no probe output from {exe} for {page}: rc={proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(m.group(1)))


def test_diagrams_render_offline_in_chromium(site: Path, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip(f"no headless Chromium ({', '.join(CHROMIUMS)}) on PATH; the static checks above still ran")
    for page, sources in _diagram_pages(site).items():
        name = page.relative_to(site)
        seen = _render_offline(exe, page, tmp_path)
        assert seen["mermaid"] == "object", f"{name}: no global mermaid after load ({seen})"
        assert not seen["remote"], f"{name}: Material fell back to a remote Mermaid: {seen['remote']}"
        assert not seen["failedScripts"], f"{name}: Mermaid failed to load offline: {seen['failedScripts']}"
        assert len(seen["svgs"]) == len(sources), (
            f"{name}: {len(seen['svgs'])} of {len(sources)} diagrams rendered offline (a diagram Mermaid "
            "cannot parse is not drawn: try it at https://mermaid.live)")
        for svg, source in zip(seen["svgs"], sources):
            assert svg["type"] and svg["width"] > 0, f"{name}: {svg['id']} is an empty drawing: {svg}"
            assert any(label.split()[0] in source for label in svg["labels"]), (
                f"{name}: {svg['id']} shows none of its source's labels: {svg['labels'][:10]}")
