"""The bearer key of OpenAI-compatible endpoints (requant's reference server and the engines it drives), read
from the environment in one place. Keys travel only in the environment, never in arguments that Prefect
records or command lines that other users can see."""

from __future__ import annotations

import os

from requant import settings

OPENAI_KEY_ENV = "OPENAI_API_KEY"  # what lm-eval's and OpenAI's own clients read


def api_key(openai_fallback: bool = False) -> str | None:
    """``$REQUANT_API_KEY``; with ``openai_fallback`` else ``$OPENAI_API_KEY``; None when unset or empty."""
    return settings.API_KEY.get() or (os.environ.get(OPENAI_KEY_ENV) if openai_fallback else None) or None
