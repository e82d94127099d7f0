"""Benchmarks: side-by-side timings, reported as ratios from one run (see bench/README.md)."""
