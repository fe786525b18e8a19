"""The reference server: load any variant (``checkpoint``), run the DeepseekV3 text model with run-time activation
QDQ (``model``, ``activations``, ``generate``) and answer OpenAI-compatible requests (``protocol``, ``server``:
``requant serve``). Launching and smoke-testing engines, this one included, is requant.engines."""
