"""Benchmarks: each prints its figures; none passes or fails on time."""
