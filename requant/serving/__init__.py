"""Serving a converted checkpoint: a reference OpenAI-compatible server, engine launchers, the smoke test."""
