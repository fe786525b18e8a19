"""The requantize flow's parameters in groups, as the Prefect UI shows them: one form per group, each field with its
default and description. Plain data (pydantic models, frozen); the flow turns them into the library's options."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from requant.constants import QUARK_RELEASES


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Conversion(_Group):
    """How the upstream is read and converted (what `requant convert` takes as options)."""

    revision: str | None = Field(None, description="Upstream revision recorded in the manifest; an hf:// upstream "
                                                    "is pinned to the commit its branch names when the run starts")
    upstream_id: str | None = Field(None, description="Upstream model id recorded in the manifest (default: the "
                                                      "last part of the upstream URI)")
    mirror: str | None = Field(None, description="s3://... or a directory: copy the hf:// revision there first "
                                                 "(resumable, checked against the Hub's digests) and convert the copy")
    quark_version: str | None = Field(None, description="The AMD Quark release whose export both checkpoints equal "
                                                        f"({', '.join(QUARK_RELEASES)}; default: each recipe's own)")
    fused_excludes: bool | None = Field(None, description="False: Quark's exclude list exactly, without the fused "
                                                          "modules SGLang and vLLM build (default: each recipe's own)")
    shared_global_scale: bool | None = Field(None, description="NVFP4: False gives llm-compressor's global scales "
                                                               "exactly (one per module but for its own fused sets); "
                                                               "default: each recipe's own (one per set the engines "
                                                               "fuse)")
    overwrite: bool = Field(True, description="Replace an output holding another run's checkpoint (False: refuse "
                                              "before any job runs); an output holding this run's is verified and "
                                              "reused either way")
    unverified: bool = Field(False, description="Convert upstream files the Hub publishes no digest for, saying so "
                                                "in the manifest and the model card (default: refuse them)")


class Cluster(_Group):
    """What each layer job (one Ray task) reserves and runs on."""

    device: str = Field("cpu", description="Torch device for the kernels (cpu, cuda, cuda:1, ...; ROCm: cuda)")
    threads: int = Field(0, ge=0, description="Transcode threads per layer job (0: as many as its CPUs)")
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves for each layer job")
    num_gpus: float | None = Field(None, ge=0, description="GPUs Ray reserves for each layer job (default: 1 with a "
                                                           "cuda device, else 0)")
    resources: dict[str, float] | None = Field(None, description="Custom Ray resources each layer job reserves "
                                                                 "(e.g. {\"mi350x\": 1})")
    expert_groups: int | None = Field(None, ge=1, description="Cut each MoE layer's job into this many jobs of "
                                                              "consecutive experts, and the non-layer job into up "
                                                              "to as many by whole tensors, each writing its own shard "
                                                              "(default: whole unless the cluster holds more jobs "
                                                              "at once than there are layers; then the split whose "
                                                              "simulated wall time is shortest)")


class Evaluation(_Group):
    """The downstream proof: a reference conversion, the smoke test and GSM8K against the reference."""

    enabled: bool = Field(True, description="Evaluate after converting (False: convert only)")
    reference_recipe: str = Field("fp8-reference", description="Recipe of the reference the candidate is judged "
                                                               "against")
    reference_output: str | None = Field(None, description="Where the reference goes (default: beside the output, "
                                                           "named after its recipe)")
    engine: str = Field("reference", description="Engine serving both checkpoints (requant/engines/engines.yaml)")
    seeds: tuple[int, ...] = Field((42, 1234, 7777), description="GSM8K seeds")
    limit: int | None = Field(None, ge=1, description="GSM8K items per seed (default: all 1319)")
    gsm8k_dir: str | None = Field(None, description="GSM8K's train and test rows (a directory; requant:trained: the "
                                                    "trained model's task; default: the offline copy, else the Hub)")
    gate: str | None = Field(None, description="A gate YAML (default: the built-in gate)")
    engine_on_ray: bool = Field(False, description="Start each engine in a Ray actor on a cluster node")
    tp: int = Field(1, ge=1, description="Tensor parallelism of each engine")


class Release(_Group):
    """How the checkpoint goes to the Hub when the run names ``release_to`` (what `requant release` takes)."""

    private: bool = Field(False, description="Create the repository private (no effect when it exists)")
    create_pr: bool = Field(False, description="Open a pull request instead of committing to the branch")
    overwrite: bool = Field(False, description="Replace a branch that holds another model's files")
    force: str | None = Field(None, description="Release although the evaluation did not PASS, giving the reason the "
                                                "model card shows (default: refuse)")
