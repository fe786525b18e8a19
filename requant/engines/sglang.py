"""SGLang: what it decides for each layer of a checkpoint, by its own model classes (no GPU needed).

SGLang serves on GPUs only, and a plain ``pip install sglang`` pulls CUDA torch and kernels, so it lives in its own
virtualenv (``make sglang-venv`` builds ``.venv-sglang`` from infra/sglang/requirements.txt: SGLang 0.5.23, CPU
torch). :func:`decide` runs :mod:`requant.engines.sglang_decide` there on checkpoints, which builds SGLang's model
for each exactly as ``sglang serve`` does (meta device, or CPU with ``load`` to feed the tensors to its weight
loaders), and turns what it wrote into per-layer decisions that :func:`summarize` compares with a recipe.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from requant import settings
from requant.engines import decisions
from requant.engines.decisions import Layer, Probe, tensor_class
from requant.engines.engines import venv_python
from requant.errors import RequantError
from requant.export import ExportFormat

VENV = ".venv-sglang"
DECIDER = Path(__file__).with_name("sglang_decide.py")
MI355X = "9.5"  # the device capability SGLang's Quark config is told (9.4: MI300X); MXFP4 needs 9.5

# SGLang's method (and scheme) for each requant target, by the checkpoint's export format and layer kind. SGLang
# 0.5.23 reads compressed-tensors MXFP4 experts with its own Mxfp4MoEMethod (no scheme).
LINEAR_METHODS = {
    ExportFormat.QUARK: {"unquantized": "UnquantizedLinearMethod", "mxfp4": "QuarkLinearMethod/QuarkW4A4MXFP4",
                         "fp8_per_channel": "QuarkLinearMethod/QuarkW8A8Fp8"},
    ExportFormat.COMPRESSED_TENSORS: {"unquantized": "UnquantizedLinearMethod"},
    ExportFormat.MODELOPT: {"unquantized": "UnquantizedLinearMethod"},
}
EXPERT_METHODS = {
    ExportFormat.QUARK: {"unquantized": "UnquantizedFusedMoEMethod", "mxfp4": "QuarkFusedMoEMethod/QuarkW4A4MXFp4MoE",
                         "fp8_per_channel": "QuarkFusedMoEMethod/QuarkW8A8FP8MoE"},
    ExportFormat.COMPRESSED_TENSORS: {"unquantized": "UnquantizedFusedMoEMethod", "mxfp4": "Mxfp4MoEMethod",
                                      "nvfp4": "CompressedTensorsFusedMoEMethod/CompressedTensorsW4A16Nvfp4MoE"},
    ExportFormat.MODELOPT: {"unquantized": "UnquantizedFusedMoEMethod", "nvfp4": "ModelOptNvFp4FusedMoEMethod"},
}
# The device capability SGLang is told, by the recipe's quantized targets: NVFP4 is served on NVIDIA Blackwell
# (10.0, B200); the rest on MI355X.
BLACKWELL = "10.0"
# SGLang's DeepSeek router (MoEGate) is a bare parameter of the model's dtype that never asks the quant config.
ROUTER = "MoEGate parameter, no quant method"


@dataclass
class Decision:
    """SGLang's decisions for one checkpoint: its layers, where building or loading stopped, the stand-ins."""
    checkpoint: str
    sglang: str
    probe: Probe
    load: dict | None        # {"ok": True} or {"ok": False, "error", "where"}; None when not asked
    stand_ins: list[str]
    draft: Decision | None = None  # the MTP draft model's (speculative NEXTN), for a checkpoint with MTP layers

    @property
    def global_scales(self) -> list[dict]:
        """Each MoE layer with one NVFP4 global scale per gate/up projection, as SGLang's loaders filled it: how many
        experts' two differ, and what SGLang's kernel preparation (one scale kept for both) made of them."""
        return (self.load or {}).get("global_scales", [])

    @property
    def built(self) -> bool:
        return self.probe.stopped is None or self.probe.stopped["stage"] != "build_layers"


def python() -> str:
    """SGLang's interpreter: ``$REQUANT_SGLANG_PYTHON``, else ``.venv-sglang`` here or in requant's checkout."""
    return venv_python("SGLang", VENV, settings.SGLANG_PYTHON.name, "sglang-venv")


def decide(checkpoints: list[str | Path], *, load: bool = False, capability: str | None = None,
           interpreter: str | None = None) -> list[Decision]:
    """SGLang's decisions for local checkpoints, in input order: one SGLang process per device capability (its
    import takes most of the time). ``capability`` None: each checkpoint's from the targets in its manifest
    (:func:`capability_for`; MI355X without a manifest)."""
    for checkpoint in checkpoints:
        if not (Path(checkpoint) / "config.json").is_file():
            raise RequantError(f"{checkpoint}: not a local checkpoint (no config.json); SGLang's decider reads files")
    groups: dict[str, list[int]] = {}
    for i, checkpoint in enumerate(checkpoints):
        groups.setdefault(capability or _manifest_capability(Path(checkpoint)), []).append(i)
    out: list[Decision | None] = [None] * len(checkpoints)
    for device, indices in groups.items():
        decided = _decide([checkpoints[i] for i in indices], load, device, interpreter)
        for i, decision in zip(indices, decided, strict=True):
            out[i] = decision
    return out  # type: ignore[return-value]


def _manifest_capability(checkpoint: Path) -> str:
    from requant.manifest import MANIFEST_FILE

    manifest = checkpoint / MANIFEST_FILE
    if not manifest.is_file():
        return MI355X
    return capability_for(json.loads(manifest.read_text())["recipe"]["targets"])


def _decide(checkpoints: list[str | Path], load: bool, capability: str, interpreter: str | None) -> list[Decision]:
    with tempfile.TemporaryDirectory(prefix="requant-sglang-") as work:
        out = Path(work) / "decisions.json"
        # -I: neither this folder (its sglang.py would shadow SGLang) nor PYTHONPATH, user site or PYTHON* variables
        command = [interpreter or python(), "-I", str(DECIDER), "--out", str(out), "--capability", capability,
                   *(["--load"] if load else []), *map(str, checkpoints)]
        done = subprocess.run(command, capture_output=True, text=True,
                              env=os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RequantError(f"SGLang's decider failed (exit {done.returncode}): {tail[0]}")
        records = json.loads(out.read_text())
    return [_decision(record) for record in records]


def _decision(record: dict) -> Decision:
    probe = Probe()
    for layer in record["layers"]:
        method = ROUTER if layer["layer_type"] == "MoEGate" else layer["quant_method"]
        probe.layers.append(Layer(layer["prefix"], layer["layer_type"], tensor_class(layer["prefix"]), method,
                                  layer["scheme"], None, None, None, built=layer.get("built", True)))
    failure = record["build_error"] and ("build_layers", record["build_error"])
    if not failure and record["load"] and not record["load"]["ok"]:
        failure = ("load_weights", record["load"])
    if failure:
        stage, error = failure
        probe.stopped = {"stage": stage, "where": (error.get("where") or [""])[-1], "error": error["error"]}
    probe.ready = not failure and bool(record["load"])
    draft = _decision(record["draft"]) if record.get("draft") else None
    return Decision(record["checkpoint"], record["sglang"], probe, record["load"], record["stand_ins"], draft)


def intended(target: str, layer: Layer, export: ExportFormat = ExportFormat.QUARK) -> str:
    """The decision SGLang should make for a layer whose tensors a recipe of ``export`` maps to ``target``."""
    unknown = f"no SGLang method known for {export} {target}"
    if layer.layer_type == "FusedMoE":
        return EXPERT_METHODS[export].get(target, unknown)
    if layer.layer_type in ("VocabParallelEmbedding", "ParallelLMHead"):
        return decisions.embedding_method(target, layer, export)
    if layer.layer_type == "MoEGate":
        return ROUTER if target == "unquantized" else f"{target} router (SGLang builds none)"
    return LINEAR_METHODS[export].get(target, unknown)


def capability_for(targets: dict[str, str]) -> str:
    """The device capability to tell SGLang for a recipe's ``targets``: Blackwell where anything is NVFP4."""
    return BLACKWELL if "nvfp4" in targets.values() else MI355X


def summarize(decision: Decision, targets: decisions.Targets | dict[str, str], export: ExportFormat = ExportFormat.QUARK) -> dict:
    """SGLang's decisions per tensor class against the ``targets`` of a recipe of ``export`` (see
    :func:`decisions.summarize`)."""
    summary = decisions.summarize(decision.probe, targets, functools.partial(intended, export=ExportFormat(export)))
    summary["global_scales"] = decision.global_scales
    if decision.load is None and decision.probe.stopped is None:
        summary["served"] = None  # decided on the meta device; the tensors were not fed to its loaders
    return summary


def format_summary(summary: dict) -> str:
    lines = [decisions.format_summary(summary, "SGLang", ready="loaded")]
    for scales in summary.get("global_scales", []):
        prepare = scales["prepare"]
        lines.append(f"{scales['prefix']}: {scales['param']} gate and up differ in {scales['gate_up_differ']} of "
                     f"{scales['experts']} experts; kernel preparation "
                     + ("done" if prepare["ok"] else f"stopped: {prepare['error'][:300]}"))
    return "\n".join(lines)

