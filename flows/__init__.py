"""Prefect flows of requant, and ``requant.flows.cli``, the ``requant`` console script that gives the library's
command line its flow-backed ``convert``. Developer entry points (``make flow-run``, ``make ui``, ...) live in
``dev/``."""
