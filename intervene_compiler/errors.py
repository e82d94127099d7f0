"""One exception hierarchy for every user mistake, each carrying the user's source line.

Every error raised for something the user wrote inside a tracing block derives from :class:`InterventionError`
and names the line (captured when the operation was recorded), says what went wrong and what to do instead.
Errors that wrap a failure of the user's own operation (an ``IndexError`` from indexing an activation, a
``RuntimeError`` from a shape mismatch) keep the original exception type as a base class, so
``except IndexError`` still works.
"""

from __future__ import annotations

import linecache
import os
import sys
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # where this package's own frames are


def _module_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) if path else None


_skip_prefixes: tuple[str, ...] | None = None


def _skipped() -> tuple[str, ...]:
    """Directories whose frames are never the user's line: ours, torch's python wrappers, einops."""
    global _skip_prefixes
    if _skip_prefixes is None:
        dirs = [PACKAGE_DIR, os.path.dirname(os.__file__) + os.sep + "contextlib.py"]
        dirs += [d for d in (_module_dir("torch"), _module_dir("einops")) if d]
        _skip_prefixes = tuple(dirs)
    return _skip_prefixes


@dataclass(frozen=True, slots=True)
class SourceLoc:
    """Where the user wrote an operation: file, line number and enclosing function."""

    filename: str
    lineno: int
    function: str

    @property
    def text(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        text = self.text
        where = f'File "{self.filename}", line {self.lineno}, in {self.function}'
        return f"{where}\n      {text}" if text else where


_user_files: dict[
    str, bool
] = {}  # filename -> does a frame of it count as the user's (decided once per file)
_locs: dict[
    tuple[str, int, str], SourceLoc
] = {}  # one SourceLoc per line: a repeated trace reuses its objects
_MAX_LOCS = 1 << 16


def _is_user_file(filename: str) -> bool:
    user = not filename.startswith(_skipped()) and not filename.startswith("<frozen")
    _user_files[filename] = user
    return user


def user_location() -> SourceLoc | None:
    """The innermost frame on the stack that belongs to the user (not this package, torch or einops).

    Runs for every recorded operation, so it is kept cheap: which files are the user's is decided once per file,
    and each line's SourceLoc is built once and shared (they are immutable).
    """
    frame: FrameType | None = sys._getframe(1)
    user_files = _user_files
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        user = user_files.get(filename)
        if user is None:
            user = _is_user_file(filename)
        if user:
            return _line_loc(filename, frame.f_lineno, code.co_name)
        frame = frame.f_back
    return None


def _line_loc(filename: str, lineno: int, function: str) -> SourceLoc:
    """The SourceLoc of a line: built once and shared (they are immutable)."""
    key = (filename, lineno, function)
    loc = _locs.get(key)
    if loc is None:
        if len(_locs) >= _MAX_LOCS:
            _locs.clear()
        loc = _locs[key] = SourceLoc(*key)
    return loc


def user_location_at(depth: int) -> SourceLoc | None:
    """``user_location()`` for a caller whose ``depth`` innermost frames (its own included) are this package's:
    the frame above them, when it is a user's line (the common case), else the full walk. A user's frame is looked
    up by its code object and instruction (``f_lineno`` and the per-line key cost more than the rest)."""
    frame = sys._getframe(depth + 1)
    code = frame.f_code
    at = (id(code), frame.f_lasti)
    hit = _at.get(at)
    # (an entry holds its code object, so that id is not reused meanwhile)
    if hit is not None and hit[0] is code:
        return hit[1]
    filename = code.co_filename
    user = _user_files.get(filename)
    if user is None:
        user = _is_user_file(filename)
    if not user:
        return user_location()
    loc = _line_loc(filename, frame.f_lineno, code.co_name)
    if len(_at) >= _MAX_LOCS:
        _at.clear()
    _at[at] = (code, loc)
    return loc


# (id of a user's code object, instruction offset) -> (the code object, its SourceLoc): user_location_at's memo
_at: dict[tuple[int, int], tuple[CodeType, SourceLoc]] = {}


class InterventionError(Exception):
    """Base class of every error this package raises for a user mistake.

    Attributes:
        loc: the user's source line the error is about (None when there is no single line).
        hint: what to do instead.
    """

    def __init__(self, message: str, loc: SourceLoc | None = None, hint: str | None = None):
        self.message = message
        self.loc = loc
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [self.message]
        if self.loc is not None:
            parts.append(f"  at your line:\n    {self.loc}")
        if self.hint:
            parts.append(f"  fix: {self.hint}")
        return "\n".join(parts)

    def __reduce__(self):  # keep pickling (e.g. by pytest-xdist) working with the extra arguments
        return (type(self), (self.message, self.loc, self.hint))


class TracingError(InterventionError):
    """A mistake in how the tracing API was used (detected while recording)."""


class ProxyControlFlowError(TracingError, TypeError):
    """Python control flow (``if``, ``for``, ``int()``) on a value that only exists when the model runs."""


class UnknownModuleError(TracingError, AttributeError):
    """An attribute or path that names no submodule of the model."""


class ModuleIndexError(UnknownModuleError, IndexError):
    """An index past the end of a ModuleList (``model.h[99]``): an IndexError, as for any Python list."""


class ValueNotReadyError(InterventionError, ValueError):
    """``.value`` read before the trace ran, of a value that was not saved, or that was never computed."""


class SetShapeError(InterventionError, ValueError):
    """A value set into a module's input or output does not have the shape of what it replaces."""


class SetValueError(InterventionError, TypeError):
    """A value set into a module's input or output that cannot stand in for what it replaces: not a tensor, a
    tensor of another kind (integer for floating point), or a tensor without data (on the meta device)."""


class InputError(InterventionError, ValueError):
    """An input the model cannot run on: no tokens, token ids outside the vocabulary or past the model's
    positions, generate arguments that ask for nothing. Checked before the model runs, in every mode."""


class GradientError(InterventionError, RuntimeError):
    """``.grad`` read or set where no backward pass produces it."""


class InvokeError(TracingError, ValueError):
    """An invoke without input, or invokes mixed with an input given to ``trace()``."""


class BarrierError(TracingError, RuntimeError):
    """A barrier that not enough invokes reach to release it."""


class MissedSiteError(InterventionError, RuntimeError):
    """A module input or output that the forward pass never produced (wrong call index, module never ran)."""


class IRVerificationError(InterventionError, AssertionError):
    """The intervention graph broke one of its invariants (a bug in a pass or a hand-built graph)."""


class SerializationError(InterventionError, TypeError):
    """A value or callable in the graph that has no plain-data form."""


class PassError(InterventionError, RuntimeError):
    """An optimization pass raised: a bug in the pass (the graph is the user's, the failure is ours)."""


def add_note(error: BaseException, text: str) -> None:
    """``error.add_note(text)`` where Python has it (3.11+; the package runs on 3.10 too, without the note)."""
    note = getattr(error, "add_note", None)
    if note is not None:
        note(text)


def check_set_shape(old: Any, new: Any, loc: SourceLoc | None, what: Any) -> None:
    """Raise SetShapeError when a tensor replaces a tensor of another shape (0-d values broadcast).

    ``what`` (a site or a string) is only formatted when raising: this also runs inside compiled programs.
    """
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and new.dim() > 0:
        if tuple(new.shape) != tuple(old.shape):
            raise SetShapeError(
                f"the value set into {what} has shape {tuple(new.shape)}, but the value it replaces has shape "
                f"{tuple(old.shape)}",
                loc,
                "set a value of the same shape, or set part of it with indexing (e.g. `out[:, -1] = v`)",
            )


def check_set_value(old: Any, new: Any, loc: SourceLoc | None, what: Any) -> None:
    """Raise SetValueError or SetShapeError when ``new`` cannot replace the tensor ``old`` at a site.

    The rule (the same eager and compiled): a set value must be a tensor (Python numbers are filled in by the
    caller, ``runtime.rows``) of ``old``'s shape (0-d tensors broadcast) and of its kind; a floating-point value of
    another precision is cast to ``old``'s dtype and a value on another device is moved to ``old``'s, as
    ``old[...] = new`` would do (``rows.conform``). Only tensors are checked: other sites take any value.
    """
    if not isinstance(old, torch.Tensor):
        return
    if not isinstance(new, torch.Tensor):
        raise SetValueError(
            f"the value set into {what} is a {type(new).__name__}, but the value it replaces is a tensor",
            loc,
            "set a tensor (for a constant, a number or `torch.full_like(value, c)`), or edit it in place: "
            "`out[:] = ...`",
        )
    if new.is_meta and not old.is_meta:
        raise SetValueError(
            f"the value set into {what} is on the meta device: it has a shape but no data",
            loc,
            "set a tensor with data (built on the model's device, or moved there with `.to(device)`)",
        )
    if new.dtype != old.dtype and _kind(new.dtype) != _kind(old.dtype):
        raise SetValueError(
            f"the value set into {what} has dtype {str(new.dtype).removeprefix('torch.')}, but the value it "
            f"replaces has dtype {str(old.dtype).removeprefix('torch.')}",
            loc,
            f"convert it first: `.to({old.dtype})` (floating-point values of another precision are cast for you)",
        )
    check_set_shape(old, new, loc, what)


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype is torch.bool else "int"


def missed_site_error(what: str, loc: SourceLoc | None, detail: str) -> MissedSiteError:
    """The error for a module input or output (``what``, e.g. ``model.layer1.output``) the run never produced."""
    return MissedSiteError(
        f"{what} was never produced: {detail}",
        loc,
        "check the module runs for this input (and how often: `.next()` moves to a later call)",
    )


_wrapped_types: dict[type, type] = {}


def execution_error(original: BaseException, loc: SourceLoc | None, what: str) -> BaseException:
    """Wrap an exception raised by a user's operation so it names the line, keeping its type as a base.

    ``except IndexError`` still catches the wrapped error; the original is chained as ``__cause__``.
    """
    if isinstance(original, InterventionError):
        return original
    hint = (
        "index within the value's shape (`.shape` inside the block shows it)"
        if isinstance(original, IndexError)
        else "fix the operation on this line (the original exception is chained as `__cause__`)"
    )
    return _wrapped(original, f"{type(original).__name__}: {original} (while running {what})", loc, hint)


def model_error(original: BaseException, loc: SourceLoc | None, meta: bool = False) -> BaseException:
    """Wrap an exception the model's own code raised while running a trace (not one of the user's operations):
    the error names the line whose input it ran on (the ``with`` of the trace), keeping the original's type as a
    base. ``meta``: the model has weights on the meta device (never loaded), the likely cause."""
    if isinstance(original, InterventionError):
        return original
    if meta:
        message = (
            f"the model's weights are on the meta device (never loaded), so it cannot run: "
            f"{type(original).__name__}: {original}"
        )
        hint = (
            "load the weights before tracing (a `LanguageModel` loads them on its first trace, or with "
            "`dispatch=True`; a plain module needs `to_empty(device=...)` and `load_state_dict`)"
        )
    else:
        message = f"the model raised {type(original).__name__} while running the input given here: {original}"
        hint = (
            "check that the input is what the model's forward takes (type, shape, dtype, device), and any value "
            "set into the model (the original exception is chained as `__cause__`)"
        )
    return _wrapped(original, message, loc, hint)


def _wrapped(original: BaseException, message: str, loc: SourceLoc | None, hint: str) -> BaseException:
    """An InterventionError that is also an instance of ``original``'s type (a class made once per type)."""
    base = type(original)
    cls: type[InterventionError] | None = _wrapped_types.get(base)
    if cls is None:
        try:
            # BaseException.__str__: types like KeyError would otherwise print the repr of the whole message
            attrs = {"__module__": base.__module__, "__str__": BaseException.__str__}
            cls = type(base.__name__, (InterventionError, base), attrs)
        except TypeError:  # layout conflict with some C exception types
            cls = InterventionError
        _wrapped_types[base] = cls
    try:
        err = cls(message, loc, hint)
    except TypeError:  # the original's __init__ wants other arguments: build it without calling that __init__
        try:
            err = cls.__new__(cls)
            err.message, err.loc, err.hint = message, loc, hint
            BaseException.__init__(err, err._format())  # noqa: SLF001 - our class, built without its __init__
        except TypeError:
            err = InterventionError(message, loc, hint)
    return err


def wrapped_error(
    original: BaseException, message: str, loc: SourceLoc | None, hint: str | None
) -> BaseException:
    """An InterventionError that is also an instance of ``original``'s type, with this message, line and fix (a
    remote job's error rebuilt on the client: ``remote/jobs.py``)."""
    return _wrapped(original, message, loc, hint or "")
