"""Test and demo infrastructure, never imported by the product (tests/test_layering.py checks it).

``synth`` writes synthetic upstreams with Kimi-K2.6's layout; ``trained`` is the small trained model, its task and
its deliberate damages; ``hubserver`` is a local Hugging Face Hub and ``seaweed`` an embedded S3 server;
``quark_reference`` runs AMD Quark as the oracle and the benchmark's baseline. Tests, dev/, infra/, the benchmarks
(requant.bench) and the ``requant hub``/``requant synth`` commands use them, importing them where they run.
"""
