"""fastfusion's benchmarks: the kernels and named shapes the ops declare (shapes.py), cases and providers (ops.py),
timing and memory (timing.py), the report CLI (``python -m benchmarks.run``) and a
pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``)."""
