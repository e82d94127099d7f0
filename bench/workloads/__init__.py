"""One module per workload; each has ``KEY``, ``TITLE`` and ``run(settings) -> WorkloadResult``."""

from . import compile_cost, generation, memory, overhead, patching, remote, scale, serving, training

ALL = {
    m.KEY: m for m in (overhead, patching, generation, training, memory, compile_cost, scale, remote, serving)
}
