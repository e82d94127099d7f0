"""Progress on long work: tqdm bars users ask for with ``progress=True`` (``session.iter``, ``generate``), and
the one line a slow first compile writes.

A bar exists only for a call made with ``progress=True``. tqdm comes with ``transformers`` (and the ``serve``
extra); without it, asking for a bar raises an ImportError that says what to install.

The first compile of the process that takes at least ``COMPILE_NOTE_S`` seconds says what it compiled and how long
it took, once, through the ``intervene_compiler`` logger (INFO, to stderr by default). Silence it with
``logging.getLogger("intervene_compiler").setLevel(logging.WARNING)`` or ``IC_COMPILE_LOG=0`` in the environment.
"""

from __future__ import annotations

import logging
import os
from typing import Any

LOGGER = logging.getLogger("intervene_compiler")
if not LOGGER.handlers:  # visible by default (as transformers' own logger is); the level is the switch
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("intervene_compiler: %(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.propagate = False
    LOGGER.setLevel(logging.INFO if os.environ.get("IC_COMPILE_LOG", "1") != "0" else logging.WARNING)

COMPILE_NOTE_S = 1.0  # a compile at least this long is worth a line (the first one in the process)
_NOTED: list[bool] = []


def note_compile(what: str, seconds: float) -> None:
    """Say, once per process, that a compile took ``seconds`` (when it took at least ``COMPILE_NOTE_S``)."""
    if _NOTED or seconds < COMPILE_NOTE_S or not LOGGER.isEnabledFor(logging.INFO):
        return
    _NOTED.append(True)
    LOGGER.info(
        "compiled %s in %.1f s; later runs of the same structure reuse it (ic.compile_stats() counts compiles; "
        "this line is written once per process, IC_COMPILE_LOG=0 silences it)",
        what,
        seconds,
    )


def progress_bar(total: int | None, desc: str, unit: str) -> Any:
    """A tqdm bar of ``total`` steps (None: unknown), written to stderr."""
    try:
        from tqdm.auto import tqdm
    except ImportError as e:
        raise ImportError("progress=True draws a tqdm bar: pip install tqdm") from e
    return tqdm(total=total, desc=desc, unit=unit, leave=True)


def length_of(items: Any) -> int | None:
    """``len(items)`` when it has one (a list, a tensor, a DataLoader), else None."""
    try:
        return len(items)
    except TypeError:
        return None


__all__ = ["COMPILE_NOTE_S", "LOGGER", "length_of", "note_compile", "progress_bar"]
