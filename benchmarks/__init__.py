"""Benchmarks: each prints a ratio against a plain baseline measured in the same run.

Run all: `python -m benchmarks` (or `make bench`); one: `python -m benchmarks transfer`.
Results are also written as JSON to benchmarks/results/.
"""
