"""The debug level: ``IC_DEBUG``, read once at import as an int (``DEBUG >= n`` turns a kind of output on).

- 1: print the optimized graph of each run;
- 2: also print the graph after each pass that changed it.

Set ``intervene_compiler.debug.DEBUG`` to change it at run time (tests do).
"""

from __future__ import annotations

import os


def _read(raw: str | None) -> int:
    if raw is None or raw.strip() == "":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"IC_DEBUG must be an integer level (0, 1, 2), got {raw!r}") from None


DEBUG: int = _read(os.environ.get("IC_DEBUG"))
