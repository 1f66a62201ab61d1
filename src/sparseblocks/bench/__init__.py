"""Benchmarks: one shared harness (ceilings, timing, floors, result files) and one module per op."""
