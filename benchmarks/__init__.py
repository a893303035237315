"""Benchmarks of procqueue against the standard library's process pools.

Run from the repository root: ``python -m benchmarks`` (see ``throughput.py``).
"""
