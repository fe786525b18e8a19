"""requant: re-quantize Kimi-K2.6-family MoE checkpoints (INT4 -> MXFP4 / FP8 / BF16).

The public API is :mod:`requant.api`, re-exported here: ``requant.convert(...)``, ``requant.verify(...)``,
``requant.evaluate(...)``, ``requant.release_checkpoint(...)``, ``requant.plan(...)``, ``requant.load_recipe(...)``, ``requant.open_storage(...)`` and
their option and result types. The package is the pure core: format kernels, checkpoint I/O, planning, layer jobs
and runs (:mod:`requant.run`). Orchestration (Prefect, Ray) lives in ``flows/`` and ``tasks/`` at the top of the
repository, installed as ``requant.flows`` and ``requant.tasks``; it only calls into the core, which never imports it.

The names are imported on first use, so ``import requant.errors`` (or the CLI's ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["DEFAULT_RECIPE", "ConvertOptions", "ConvertSummary", "EvalOptions", "Plan", "Recipe", "ReleaseOptions",
           "ReleaseResult", "VerifySummary", "convert", "evaluate", "load_recipe", "open_storage", "plan",
           "release_checkpoint", "verify"]

if TYPE_CHECKING:
    from requant.api import (
        DEFAULT_RECIPE,
        ConvertOptions,
        ConvertSummary,
        EvalOptions,
        Plan,
        Recipe,
        ReleaseOptions,
        ReleaseResult,
        VerifySummary,
        convert,
        evaluate,
        load_recipe,
        open_storage,
        plan,
        release_checkpoint,
        verify,
    )


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("requant.api"), name)
    raise AttributeError(f"module 'requant' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
