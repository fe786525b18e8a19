"""Benchmarks: ``conversion`` (``requant bench``: the kernels and a whole-checkpoint conversion against
Quark 0.11) and ``serve`` (``requant bench-serve``: reference-server throughput and lm-eval time). The flow's
own benchmark (``make bench-flow``) needs Prefect and Ray and lives in ``dev/bench.py``."""
