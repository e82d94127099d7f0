"""Plots of the numbers an interpretability experiment computes: a patching heatmap and a logit lens.

The functions take your results (a tensor or array with one value per layer and position) and the prompt's tokens,
and draw them with layers on the y axis and the tokens as x tick labels. They return ``(figure, axes)``; with
``path=`` they also write a PNG. Without ``ax=`` they draw on a new figure with the non-interactive Agg canvas (no
pyplot, no GUI, no global backend switch), so they work in scripts, tests and servers; pass ``ax=`` to draw into
a figure of your own (a notebook's, a subplot grid).

matplotlib is an optional dependency: ``pip install 'intervene_compiler[plot]'``. ``import intervene_compiler``
never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MISSING_MATPLOTLIB = (
    "intervene_compiler.plot draws with matplotlib, which is not installed: "
    "pip install 'intervene_compiler[plot]' (or pip install matplotlib)"
)

try:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as e:  # matplotlib brings numpy: a missing numpy is the same missing extra
    raise ImportError(MISSING_MATPLOTLIB) from e

PATCHING_TITLE = "Activation patching: normalized effect (0 = corrupted run, 1 = clean run)"
MAX_ANNOTATED_CELLS = 300  # above this many cells the numbers are left out of the heatmap (unreadable)


def patching_heatmap(
    effect: Any,
    tokens: Sequence[str],
    layers: Sequence[Any] | None = None,
    title: str = PATCHING_TITLE,
    path: str | None = None,
    ax: Any = None,
    annotate: bool | None = None,
    colorbar_label: str = "patching effect",
) -> tuple[Any, Any]:
    """Draw an activation-patching result: one cell per (layer, position), layers up the y axis.

    The colour scale is centred on 0 and symmetric (blue below 0, red above), so a normalized effect reads as
    white for "no effect" and dark red for "restores the clean run".

    Args:
        effect: a (layers, positions) tensor, array or nested list, e.g. the normalized patching effect
            ``(patched - corrupted) / (clean - corrupted)`` of a logit difference.
        tokens: one label per position (the prompt's tokens), the x tick labels.
        layers: one label per row (default ``0 .. layers - 1``).
        title: the axes' title.
        path: write the figure there as a PNG too.
        ax: draw into this matplotlib Axes instead of a new figure.
        annotate: write each cell's value in it (default: when there are at most 300 cells).
        colorbar_label: the colour bar's label.
    Returns:
        ``(figure, axes)``.
    Raises:
        ValueError: ``effect`` is not 2-D, or ``tokens``/``layers`` do not match its columns/rows.

    Example::

        from intervene_compiler.plot import patching_heatmap

        fig, ax = patching_heatmap(effect, model.tokenizer.tokenize(prompt), path="patching.png")
    """
    grid = _grid(effect, "effect", tokens, layers)
    finite = grid[np.isfinite(grid)]
    bound = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    fig, ax = _axes(ax, grid.shape)
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    _label(ax, tokens, layers, grid.shape[0], title)
    if annotate if annotate is not None else grid.size <= MAX_ANNOTATED_CELLS:
        _write_cells(ax, grid, [[_num(v) for v in row] for row in grid], lambda v: abs(v) > 0.6 * bound)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return _finish(fig, ax, path)


def logit_lens(
    values: Any,
    tokens: Sequence[str],
    top_tokens: Sequence[Sequence[str]] | None = None,
    layers: Sequence[Any] | None = None,
    title: str = "Logit lens",
    path: str | None = None,
    ax: Any = None,
    colorbar_label: str = "probability",
) -> tuple[Any, Any]:
    """Draw a logit lens: what each layer's residual stream predicts at each position when unembedded.

    You compute the numbers (for example ``softmax(lm_head(ln_f(block.output)))`` per block, inside a trace) and
    pass, per layer and position, the probability of a token you chose or of the top token; ``top_tokens``
    writes the top token's text in each cell.

    Args:
        values: a (layers, positions) tensor, array or nested list of probabilities (or any score).
        tokens: one label per position (the prompt's tokens), the x tick labels.
        top_tokens: optional (layers, positions) strings written in the cells (e.g. each cell's top token);
            without it the cells show ``values``.
        layers: one label per row (default ``0 .. layers - 1``).
        title: the axes' title.
        path: write the figure there as a PNG too.
        ax: draw into this matplotlib Axes instead of a new figure.
        colorbar_label: the colour bar's label.
    Returns:
        ``(figure, axes)``.
    Raises:
        ValueError: the shapes of ``values``, ``tokens``, ``top_tokens`` and ``layers`` do not agree.

    Example::

        from intervene_compiler.plot import logit_lens

        fig, ax = logit_lens(probs, tokens, top_tokens=tops, path="lens.png")  # probs: (layers, positions)
    """
    grid = _grid(values, "values", tokens, layers)
    if top_tokens is not None:
        rows = [list(row) for row in top_tokens]
        if len(rows) != grid.shape[0] or any(len(row) != grid.shape[1] for row in rows):
            raise ValueError(
                f"top_tokens must have one string per cell of values, {grid.shape[0]} rows of "
                f"{grid.shape[1]}; got rows of lengths {[len(row) for row in rows]}"
            )
        texts = [[str(t) for t in row] for row in rows]
    else:
        texts = [[_num(v) for v in row] for row in grid]
    finite = grid[np.isfinite(grid)]
    in_unit = finite.size > 0 and finite.min() >= 0.0 and finite.max() <= 1.0
    vmin, vmax = (0.0, 1.0) if in_unit else (None, None)
    fig, ax = _axes(ax, grid.shape)
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", origin="lower")
    _label(ax, tokens, layers, grid.shape[0], title)
    high = float(image.norm.vmin) + 0.6 * (float(image.norm.vmax) - float(image.norm.vmin))
    _write_cells(ax, grid, texts, lambda v: v < high)  # viridis is dark at the low end
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return _finish(fig, ax, path)


def _grid(values: Any, name: str, tokens: Sequence[str], layers: Sequence[Any] | None) -> Any:
    """``values`` as a 2-D float array whose shape matches the labels."""
    if hasattr(values, "detach"):  # a torch tensor, on any device and dtype
        values = values.detach().float().cpu().numpy()
    grid = np.asarray(values, dtype=float)
    if grid.ndim != 2:
        raise ValueError(f"{name} must be 2-D (layers, positions); got shape {tuple(grid.shape)}")
    if len(tokens) != grid.shape[1]:
        raise ValueError(
            f"{name} has {grid.shape[1]} positions but {len(tokens)} tokens were given: pass one token label "
            "per position (e.g. model.tokenizer.convert_ids_to_tokens(ids))"
        )
    if layers is not None and len(layers) != grid.shape[0]:
        raise ValueError(f"{name} has {grid.shape[0]} layers but {len(layers)} layer labels were given")
    return grid


def _axes(ax: Any, shape: tuple[int, int]) -> tuple[Any, Any]:
    """The given Axes and its figure, or a new figure on an Agg canvas sized for ``shape`` cells."""
    if ax is not None:
        return ax.figure, ax
    rows, cols = shape
    fig = Figure(figsize=(2.5 + 0.55 * cols, 1.6 + 0.45 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _label(ax: Any, tokens: Sequence[str], layers: Sequence[Any] | None, rows: int, title: str) -> None:
    labels = [str(t) for t in tokens]
    long = max((len(t) for t in labels), default=0) > 4
    ax.set_xticks(range(len(labels)), labels, rotation=60 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(rows), [str(x) for x in (layers if layers is not None else range(rows))])
    ax.set_xlabel("token (position)")
    ax.set_ylabel("layer")
    ax.set_title(title)


def _write_cells(ax: Any, grid: Any, texts: list[list[str]], light: Any) -> None:
    """Write ``texts`` in the cells, white on the cells where ``light(value)`` (dark colours)."""
    for (row, col), value in np.ndenumerate(grid):
        color = "white" if np.isfinite(value) and light(value) else "black"
        ax.text(col, row, texts[row][col], ha="center", va="center", fontsize=8, color=color)


def _num(value: float) -> str:
    """Two decimals, never ``-0.00``."""
    return f"{round(float(value), 2) + 0.0:.2f}"


def _finish(fig: Any, ax: Any, path: str | None) -> tuple[Any, Any]:
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig, ax


__all__ = ["MISSING_MATPLOTLIB", "logit_lens", "patching_heatmap"]
