"""Backends lower an optimized intervention graph onto a running model. ``eager`` is the reference."""
