"""Benchmark scripts (run as modules from the repository root, e.g.
`python -m benchmarks.screening_bench`); they print ratios measured side by side."""
