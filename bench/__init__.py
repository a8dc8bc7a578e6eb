"""Benchmarks: each script prints its figures and names its section of docs/benchmarks.md."""
