"""The typed options of a conversion and the summary it returns, shared by the API, the CLI and the flows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConvertOptions:
    """How a conversion runs.

    ``quark_version``: the Quark release whose export the output equals byte for byte (default: the recipe's, 0.11);
    ``fused_excludes``: False writes Quark's exclude list without the engines' fused names (default: the recipe's);
    ``shared_global_scale``: False gives NVFP4 modules llm-compressor's global scales, one per module but for its own
    fused sets (default: the recipe's; one per set of modules the engines fuse);
    ``device``: torch device for the kernels (cpu, cuda, cuda:1, ...); ``threads``: transcode threads per layer job
    (0: every core this process may use); ``jobs``: layer jobs converted at once in worker processes (0: sized to
    the cores, the memory and the work; local conversions only); ``expert_groups``: each MoE layer's job cut
    into this many jobs of consecutive experts, the non-layer job into up to as many by whole tensors, each writing
    its own shard (None: as the runner's workers call for,
    :func:`requant.sizing.expert_groups_for`: whole unless they outnumber the jobs, so always whole locally, where
    worker processes never outnumber the jobs); ``overwrite``: replace a converted checkpoint
    already at the destination; ``unverified``: convert upstream files the Hub publishes no digest for (refused by
    default), saying so in the manifest and the model card; ``upstream_id`` and ``revision``: what the manifest
    records as the upstream (default: the directory name, the Hub commit); ``progress``: a progress bar.
    """

    quark_version: str | None = None
    fused_excludes: bool | None = None
    shared_global_scale: bool | None = None
    device: str = "cpu"
    threads: int = 0
    jobs: int = 0
    expert_groups: int | None = None
    overwrite: bool = False
    unverified: bool = False
    upstream_id: str | None = None
    revision: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class ConvertSummary:
    """What a conversion did. ``resumed``: layer jobs an earlier run of the same key had finished; ``reused``: the
    whole checkpoint was already there from the same run (verified, not converted again); ``manifest``: the
    published manifest (None when reused); ``nodes``: where the layer jobs ran (the flow's Ray nodes)."""

    output: str
    recipe: str
    run_key: str
    jobs: int
    resumed: int
    tensors: int
    reused: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    unverified_inputs: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] | None = field(default=None, repr=False, compare=False)
