"""The user guide (docs/index.md, docs/guide/*.md) runs as written, and the site builds with ``mkdocs --strict``.

Conventions for the guide's Markdown, which this file enforces:

- Every fenced block whose info string starts with ``python`` (``python title="..."`` included) is run, in page
  order, in one namespace per page (later blocks use earlier names), with a fresh temporary directory as the
  working directory (``save_tiny_lm("tiny-gpt2")`` writes there). Line numbers in errors are the page's.
- A ``text`` block that follows a ``python`` block with only blank lines between is that block's printed output:
  what the block prints must equal it (trailing whitespace aside).
- A ``python`` block is shown without being run only when the line before its fence is
  ``<!-- not run: <reason> -->`` (an HTML comment: the site does not show it). ``NOT_RUN`` below lists every such
  block by page and first line with the same reason, so a new one fails here until it is listed. Today none is.
- The warnings a page raises (ours: those attributed to the page or to the package) must be the ones
  ``WARNS[page]`` names; other pages raise none.
- guide/remote.md runs against a real server: the commands of its ```` ```bash title="server" ```` block (make
  the model folder, make a key, start ``intervene-serve``, export the client's settings) are carried out here, the
  port replaced by a free loopback port and the key by the one ``--add-key`` printed, and the server is stopped
  after the page.
- guide/compiling.md compiles (``compiled`` tier); guide/remote.md runs a server (``remote`` tier).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from intervene_compiler.testing import stop_process

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = ["index.md", *sorted(f"guide/{p.name}" for p in (DOCS / "guide").glob("*.md"))]
MARKS = {"guide/compiling.md": [pytest.mark.compiled], "guide/remote.md": [pytest.mark.remote]}

# (page, first line of the block) -> reason: blocks shown but not run, each after `<!-- not run: reason -->`
NOT_RUN: dict[tuple[str, str], str] = {}

# page -> a substring of each warning its code raises, in order
WARNS = {
    "guide/compiling.md": [
        "CUDA graphs need a CUDA device: compile='reduce-overhead' runs as compile=True here"
    ],
}


@dataclass
class Block:
    """One fenced block of a page: its language (first word of the info string), info string, the indices of its
    opening and closing fence lines, its text, the ``text`` block shown as its output, and the reason the page
    gives for not running it (None: it runs)."""

    lang: str
    info: str
    start: int
    end: int
    code: str
    output: str | None = None
    not_run: str | None = None

    @property
    def line(self) -> int:
        """The page's line number (1-based) of the block's first line."""
        return self.start + 2


_FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
_NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")


def blocks(page: str) -> list[Block]:
    """The fenced blocks of ``docs/<page>`` in order, each ``python`` block with the output shown after it."""
    lines = (DOCS / page).read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        assert end < len(lines), f"docs/{page}:{i + 1}: fence never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        reason = _NOT_RUN.match(before)
        found.append(
            Block(
                lang=info.split()[0] if info else "",
                info=info,
                start=i,
                end=end,
                code="\n".join(lines[i + 1 : end]) + "\n",
                not_run=reason.group(1) if reason else None,
            )
        )
        i = end + 1
    for prev, block in zip(found, found[1:]):
        between = lines[prev.end + 1 : block.start]
        if prev.lang == "python" and block.lang == "text" and not any(line.strip() for line in between):
            prev.output = block.code
    return found


def _strip(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_page(page: str) -> dict:
    """Run the page's python blocks in one namespace; check each shown output and the page's warnings."""
    path = str(DOCS / page)
    scope: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for block in blocks(page):
            if block.lang != "python" or block.not_run is not None:
                continue
            code = compile("\n" * (block.line - 1) + block.code, path, "exec")  # the page's line numbers
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code, scope)
            if block.output is not None:
                assert _strip(out.getvalue()) == _strip(block.output), (
                    f"docs/{page}:{block.line}: the block printed\n{out.getvalue()}\nbut the page shows\n"
                    f"{block.output}"
                )
    package = str(ROOT / "intervene_compiler")
    ours = [str(w.message) for w in caught if w.filename == path or w.filename.startswith(package)]
    expected = WARNS.get(page, [])
    assert len(ours) == len(expected) and all(e in got for e, got in zip(expected, ours)), (
        f"docs/{page} raised warnings {ours}, expected {expected}"
    )
    return scope


@pytest.mark.parametrize("page", [pytest.param(p, marks=MARKS.get(p, [])) for p in PAGES])
def test_page_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if page == "guide/remote.md":
        server = RemoteSetup(tmp_path, monkeypatch)
        try:
            server.run(page)
            run_page(page)
        finally:
            server.stop()
    else:
        run_page(page)


def test_blocks_shown_but_not_run_are_listed():
    marked = {
        (page, b.code.strip().splitlines()[0]): b.not_run
        for page in PAGES
        for b in blocks(page)
        if b.not_run is not None
    }
    assert marked == NOT_RUN, (
        "a block marked <!-- not run: reason --> must be listed in NOT_RUN with its reason"
    )


def test_every_guide_page_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f" {page}" in nav, f"docs/{page} is not in mkdocs.yml's nav"


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (broken links and anchors, griffe's docstring warnings) into a temporary dir."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    assert (tmp_path / "site" / "reference" / "index.html").exists()


# -- the remote page's server -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteSetup:
    """Carries out the commands of the page's ``bash title="server"`` block: ``python ...`` lines run with this
    interpreter, ``intervene-serve ... --add-key`` makes the key (its printed key replaces ``ic-...``),
    ``intervene-serve`` starts the server in the background on a free port (replacing ``--port``), ``export``
    sets the client's environment, which ``ic.CONFIG.reload()`` reads as an import would."""

    def __init__(self, root: Path, monkeypatch):
        self.root = root
        self.monkeypatch = monkeypatch
        self.port = _free_port()
        self.key: str | None = None
        self.proc: subprocess.Popen | None = None

    def commands(self, page: str) -> list[str]:
        (block,) = [b for b in blocks(page) if b.lang == "bash" and 'title="server"' in b.info]
        text = re.sub(r"\\\n\s*", " ", block.code)  # continuation lines
        return [c.split("#")[0].strip() for c in text.splitlines() if c.split("#")[0].strip()]

    def run(self, page: str) -> None:
        import httpx

        import intervene_compiler as ic

        self.monkeypatch.setenv("IC_CONFIG_DIR", str(self.root / "config"))  # no user config file is read
        for command in self.commands(page):
            # the page starts the server in the background: `&` is dropped, Popen runs it so
            argv = [a for a in shlex.split(command) if a != "&"]
            if argv[0] in ("python", "python3"):
                subprocess.run([sys.executable, *argv[1:]], cwd=self.root, check=True, capture_output=True)
            elif argv[0] == "intervene-serve" and "--add-key" in argv:
                done = subprocess.run(
                    self._serve(argv), cwd=self.root, check=True, capture_output=True, text=True
                )
                self.key = done.stdout.strip().splitlines()[-1]
            elif argv[0] == "intervene-serve":
                argv = self._port(argv)
                with open(self.root / "server.log", "ab") as log:
                    self.proc = subprocess.Popen(
                        self._serve(argv), cwd=self.root, stdout=log, stderr=subprocess.STDOUT
                    )
            elif argv[0] == "export":
                name, value = argv[1].split("=", 1)
                assert self.key is not None, "the page exports the key before making it"
                value = value.replace("ic-...", self.key).replace(":8000", f":{self.port}")
                self.monkeypatch.setenv(name, value)
            else:
                raise AssertionError(f"docs/{page}: a server command this test does not know: {command}")
        assert self.proc is not None, f"docs/{page} starts no server"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        self.monkeypatch.setattr(ic.CONFIG, "API", ic.CONFIG.API)  # restored after the test
        self.monkeypatch.setattr(ic.CONFIG, "APP", ic.CONFIG.APP)
        ic.CONFIG.reload()

    def _serve(self, argv: list[str]) -> list[str]:
        return [sys.executable, "-m", "intervene_compiler.remote", *argv[1:]]

    def _port(self, argv: list[str]) -> list[str]:
        assert "--port" in argv, "the page's server command names its port"
        i = argv.index("--port")
        return [*argv[: i + 1], str(self.port), *argv[i + 2 :]]

    def stop(self) -> None:
        stop_process(self.proc)
