"""Driving any OpenAI-compatible serving engine: ``engines`` launches one from a command template of
``engines.yaml`` (requant's reference server, vLLM, ATOM, SGLang) or attaches to a running one, and ``smoke``
smoke-tests it against ``smoke.yaml``'s limits. Nothing here depends on how the engine computes."""
