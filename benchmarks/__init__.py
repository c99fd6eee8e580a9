"""fastfusion's benchmarks: named shapes (shapes.py), kernels and providers (ops.py),
timing and memory (timing.py), the report CLI (``python -m benchmarks.run``) and a
pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``)."""
