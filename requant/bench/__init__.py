"""Benchmarks, one module per ``requant bench`` subcommand: ``conversion`` (the kernels and a whole-checkpoint
conversion against Quark 0.11), ``layer`` (one K2.6 layer at real widths against its rooflines), ``peers`` (the
other converters raced), ``hub`` (reading from a Hub) and ``serve`` (reference-server throughput and lm-eval time).
Each takes plain typed parameters; the command line (requant.cli.bench) parses them. The benchmarks that need
Prefect and Ray (``make bench-flow``, the S3 part of ``make bench-layer``) live in ``dev/bench.py``."""
