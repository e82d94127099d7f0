"""The layout is the architecture: import rules between the package's layers, and no import cycles.

front-end (tracing, models) -> execute (the seam) -> backends; pipeline -> passes; everything may use ir,
errors and runtime. These tests read the source (every import statement, inside functions and
``TYPE_CHECKING`` blocks too) and import each module alone in a fresh process.
"""

from __future__ import annotations

import ast
import pkgutil
import sys
from pathlib import Path

import pytest

import intervene_compiler

ROOT = Path(intervene_compiler.__file__).parent
PACKAGE = "intervene_compiler"


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {PACKAGE: ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix=PACKAGE + "."):
        spec = info.module_finder.find_spec(info.name)  # type: ignore[call-arg]
        out[info.name] = Path(spec.origin)
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    """The layer a module belongs to: its subpackage (``backends.eager`` for the eager backend's modules, the
    module itself for a top-level one such as ``pipeline``)."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "backends" and len(parts) > 1 and (ROOT / "backends" / parts[1]).is_dir():
        return "backends." + parts[1]
    return parts[0]


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                if full in MODULES:  # `from . import packing`: a submodule, not a name
                    out.append((full, None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m == PACKAGE or m.startswith(PACKAGE + ".")]


# layer -> the layers it may import (besides itself). The front-end reaches the backends only through
# ``execute``; backends never reach the front-end; passes see only the IR.
ALLOWED = {
    "errors": set(),
    "debug": set(),
    "config": set(),  # the user's settings (ic.CONFIG): read by remote execution
    "ir": {"errors"},
    "passes": {"ir", "errors"},
    "runtime": {"ir", "errors"},
    "pipeline": {"ir", "errors", "passes", "debug"},
    "backends": {"backends.eager", "backends.compiled", "ir", "errors", "runtime"},
    "backends.eager": {"ir", "errors", "runtime"},
    "backends.compiled": {"backends.eager", "ir", "errors", "runtime"},
    "execute": {
        "backends",
        "backends.eager",
        "backends.compiled",
        "ir",
        "errors",
        "runtime",
        "pipeline",
        "debug",
    },
    "tracing": {"ir", "errors", "runtime", "pipeline", "execute", "remote"},
    # remote execution: the client (used by tracing) and the service, which runs requests on models
    "remote": {"", "ir", "errors", "runtime", "config", "tracing", "models", "execute"},
    "models": {"tracing", "ir", "errors", "runtime"},
    "testing": {"", "tracing", "models", "ir", "errors", "runtime"},
    "testing_families": {"", "testing", "tracing", "models", "ir", "errors", "runtime"},
    "demo": {"", "models", "testing", "errors", "plot"},
    "plot": set(),  # matplotlib drawings of results users computed: imports nothing of the package
    "": {
        "backends.compiled",
        "config",
        "errors",
        "execute",
        "ir",
        "models",
        "runtime",
        "tracing",
    },  # the package's __init__: a table of contents
}


def test_every_layer_is_listed():
    assert {_layer(m) for m in MODULES} <= set(ALLOWED), {_layer(m) for m in MODULES} - set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    layer = _layer(module)
    bad = []
    for target, _, line in _imports(module):
        other = _layer(target) if target != PACKAGE else ""
        if other != layer and other not in ALLOWED[layer]:
            bad.append(f"line {line}: {layer or PACKAGE} imports {target} ({other or PACKAGE})")
    assert not bad, f"{module}:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_layers(module):
    """A module uses another layer's public names only (``from ..x import _y`` is a private dependency)."""
    layer = _layer(module)
    bad = [
        f"line {line}: {target}.{name}"
        for target, name, line in _imports(module)
        if name is not None
        and name.startswith("_")
        and not name.startswith("__")
        and (_layer(target) if target != PACKAGE else "") != layer
    ]
    assert not bad, f"{module} imports private names of other layers:\n" + "\n".join(bad)


def test_only_the_pipeline_imports_passes():
    importers = {
        m for m in MODULES if _layer(m) != "passes" and any(_layer(t) == "passes" for t, _, _ in _imports(m))
    }
    assert importers == {PACKAGE + ".pipeline"}


# Runs in a child interpreter: loads torch and transformers (third-party: not ours), then, for each module, forks
# and imports that module first in the fork.
_ALONE = """
import multiprocessing, sys
import torch, transformers

assert not any(m.startswith("intervene_compiler") for m in sys.modules)


def alone(name, queue):
    try:
        __import__(name)
    except BaseException as e:
        queue.put(f"{name}: {type(e).__name__}: {e}")
    else:
        queue.put(None)


ctx = multiprocessing.get_context("fork")
failures = []
for name in sys.argv[1:]:
    queue = ctx.Queue()
    proc = ctx.Process(target=alone, args=(name, queue))
    proc.start()
    proc.join(120)
    got = queue.get(timeout=5) if proc.exitcode == 0 else f"{name}: exit code {proc.exitcode}"
    if got is not None:
        failures.append(got)
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_each_module_imports_alone():
    """Import every module first, alone, in a fresh process: an import cycle fails as a partially initialized
    module (``import intervene_compiler.passes`` first, say)."""
    import subprocess

    repo = str(ROOT.parent)
    out = subprocess.run(
        [sys.executable, "-c", _ALONE, *sorted(MODULES)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
