"""requant: re-quantize Kimi-K2.6-family MoE checkpoints (INT4 -> MXFP4 / FP8 / BF16).

The package is the pure core: format kernels, checkpoint I/O, planning and layer jobs.
Orchestration (Prefect, Ray) lives in ``flows/`` and ``tasks/`` and only calls into it.
"""

__version__ = "0.1.0"
