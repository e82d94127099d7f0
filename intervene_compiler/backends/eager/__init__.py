"""The eager backend: the reference semantics (hooks run the IR while the model runs).

``run_graph`` (runner.py) is the backend's entry. :class:`Interpreter` (interpreter.py), its :class:`NodeState`
and :class:`EarlyStop` (states.py) are public for the other backends: the compiled backend records and replays
the interpreter's schedule by subclassing it, and compiled generation runs a block's outer nodes on it. See
runner.py's docstring for the modules and what each owns.
"""

from .gradients import no_backward_error, no_grad_error
from .interpreter import Interpreter
from .reuse import leaves, plain_values, same_leaves
from .runner import run_graph
from .states import EarlyStop, NodeState

__all__ = [
    "EarlyStop",
    "Interpreter",
    "NodeState",
    "leaves",
    "no_backward_error",
    "no_grad_error",
    "plain_values",
    "run_graph",
    "same_leaves",
]
