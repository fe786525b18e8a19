"""The requantize flow: plan and validate, fan the layer jobs out over Ray, publish, verify.

Parameters: upstream URI (directory, s3://bucket/prefix or hf://org/repo@revision), recipe, output
URI (directory or s3://). Ray: a local cluster by default, ``RAY_ADDRESS`` to join one. Tensors move
through object storage; only plans and small results go through Ray.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.utilities.annotations import quote
from prefect_ray.context import remote_options
from tqdm import tqdm

from requant import run, stages
from requant.api import DEFAULT_RECIPE
from requant.errors import RequantError, VerifyError
from requant.flows.parameters import Cluster, Conversion, Evaluation, Release
from requant.flows.runtime import EnvRayTaskRunner, worker_slots
from requant.io.hf import pin_upstream
from requant.io.storage import open_storage
from requant.io.transfer import object_url
from requant.manifest import MANIFEST_FILE
from requant.planning import Plan, split_plan
from requant.progress import phase
from requant.run import ConvertSummary, JobOutcome
from requant.sizing import expert_groups_for
from requant.tasks.convert import (
    Sealed,
    convert_layer,
    hash_groups,
    hash_input,
    hash_output,
    plan_checkpoint,
    publish_checkpoint,
    verify_checkpoint,
)
from requant.verification import VerifySummary


@dataclass(frozen=True)
class RequantizeResult:
    """What the requantize flow did: the conversion, and with ``evaluate`` the reference's conversion and the
    evaluation flow's summary; with ``mirror`` the mirror-upstream flow's summary."""

    conversion: ConvertSummary
    reference: ConvertSummary | None = None
    evaluation: dict[str, Any] | None = None
    mirror: dict[str, Any] | None = None
    release: Any = None  # requant.release.ReleaseResult with ``release_to``


@flow(name="requantize", task_runner=EnvRayTaskRunner(), log_prints=True)
def requantize(upstream: str, output: str, recipe: str = DEFAULT_RECIPE, conversion: Conversion = Conversion(),
               cluster: Cluster = Cluster(), evaluation: Evaluation = Evaluation(), release_to: str | None = None,
               release: Release = Release(), progress: bool = True) -> RequantizeResult:
    """Convert ``upstream`` (a directory, s3://bucket/prefix or hf://org/repo@revision) with ``recipe`` into
    ``output`` (a directory or s3://); then, with ``evaluation.enabled``, produce or reuse the reference variant
    (default: beside ``output``) and run the smoke test and the GSM8K comparison (the evaluate flow).

    Each layer job is a Ray task reserving what ``cluster`` says. An output that holds this run's checkpoint is
    verified and reused; one that holds another run's is replaced, or with ``conversion.overwrite`` False refused
    before any job runs. An ``hf://`` upstream is pinned to the commit its branch names when the run starts; with
    ``conversion.mirror`` that revision is first copied there (the mirror-upstream flow) and converted from the
    copy. With ``release_to`` (``hf://ORG/REPO[@BRANCH]``) a checkpoint whose evaluation PASSed is then released there
    (requant.release), and a refused one says why beside the checkpoint. The groups' fields are described in
    :mod:`requant.flows.parameters`."""
    if release_to:
        from requant.release import parse_target

        parse_target(release_to)  # a malformed target fails before any job runs
    mirrored = None
    if conversion.mirror:  # hf:// copied once into object storage, then every conversion reads the copy
        if not upstream.startswith("hf://"):
            raise RequantError(f"mirror={conversion.mirror}: mirroring copies a Hub upstream (hf://...), not {upstream}")
        from requant.flows.mirror import mirror_upstream

        mirrored = mirror_upstream(upstream, conversion.mirror)
        upstream = mirrored["source"]  # the commit that was mirrored
    upstream, revision, upstream_id = pin_upstream(upstream, conversion.revision, conversion.upstream_id)
    meta = {"uri": upstream, "id": upstream_id or upstream.rstrip("/").rsplit("/", 1)[-1], "revision": revision or "unpinned"}
    if mirrored:
        upstream = mirrored["snapshot"]
    result = RequantizeResult(_convert(upstream, output, recipe, revision, meta, conversion, cluster, progress,
                                       "requantize"), mirror=mirrored)
    if not evaluation.enabled:
        return _release(result, output, release_to, release) if release_to else result
    from requant.flows.evaluate import evaluate as evaluate_flow  # scipy, matplotlib, lm-eval: only when evaluating

    reference_output = evaluation.reference_output or f"{output.rstrip('/').rsplit('/', 1)[0]}/{evaluation.reference_recipe}"
    if reference_output.rstrip("/") == output.rstrip("/"):
        raise RequantError(f"reference output {reference_output} is the candidate's own output; set "
                           f"evaluation.reference_output")
    reference = _convert(upstream, reference_output, evaluation.reference_recipe, revision, meta, conversion, cluster,
                         progress, "reference")
    try:
        summary = evaluate_flow(output, reference_output, engine=evaluation.engine, seeds=list(evaluation.seeds),
                                limit=evaluation.limit, gsm8k_dir=evaluation.gsm8k_dir, gate=evaluation.gate,
                                progress=progress, engine_on_ray=evaluation.engine_on_ray, tp=evaluation.tp)
    except RequantError as exc:
        if not release_to:
            raise
        if not release.force:
            _refuse(output, release_to, exc)
            raise
        get_run_logger().warning("evaluation stopped (%s); releasing anyway, forced: %s", exc, release.force)
        summary = {"failed": str(exc)}
    result = dataclasses.replace(result, reference=reference, evaluation=summary)
    return _release(result, output, release_to, release) if release_to else result


def _release(result: RequantizeResult, output: str, release_to: str, options: Release) -> RequantizeResult:
    """The release step: after the gate, the checkpoint to the Hub; its commit as an artifact."""
    from requant.release import ReleaseOptions
    from requant.tasks.release import release_checkpoint

    with phase(f"release {output} to {release_to}") as shown:
        released = release_checkpoint(output, release_to, ReleaseOptions(
            private=options.private, create_pr=options.create_pr, force=options.force, overwrite=options.overwrite))
        shown.result(released.record.describe())
    get_run_logger().info("%s: %s", release_to, released.record.describe())
    create_link_artifact(released.pull_request or released.url, link_text=f"release on the Hub ({release_to})",
                         key="release", description=f"commit {released.commit}")
    return dataclasses.replace(result, release=released)


def _refuse(output: str, release_to: str, exc: RequantError) -> None:
    """The evaluation stopped the run: record beside the checkpoint that it was not released, and why."""
    from requant.release import evaluation_verdict
    from requant.tasks.release import record_refusal

    try:
        verdict = evaluation_verdict(_manifest(output))
    except (RequantError, OSError, ValueError):
        verdict = "NOT-EVALUATED"
    record_refusal(output, release_to, verdict, f"evaluation {verdict}: {exc}")


def _manifest(output: str) -> dict:
    from requant.manifest import read_manifest

    return read_manifest(open_storage(output))


def _convert(upstream: str, output: str, recipe: str, revision: str | None, meta: dict, conversion: Conversion,
             cluster: Cluster, progress: bool, role: str) -> ConvertSummary:
    """One run (requant.run) with its layer jobs on the flow's Ray runner; a checkpoint already published by the
    same run key is verified and reused."""
    logger = get_run_logger()
    started = time.perf_counter()
    plan = plan_checkpoint(upstream, recipe, conversion.quark_version, conversion.fused_excludes,
                           conversion.shared_global_scale)  # every problem, before any job
    options = ray_options(cluster)
    plan = _sized(plan, cluster, options, role)
    start = run.start_run(plan, open_storage(upstream), output, revision, conversion.unverified, conversion.overwrite)
    timings = {"plan": time.perf_counter() - started}
    if start.published:
        with phase(f"{role}: {recipe}") as shown:
            _verify(plan, output, options)
            shown.result(f"{output} already holds this run (verified), reused")
        logger.info("%s: %s already holds run %s (verified); reusing it", role, output, start.key)
        return run.summarize(plan, output, start.key, [], None, timings, start.unverified_inputs)
    with run.output_lease(output, start.key) as lease:  # a second run on this output fails here, naming us
        if lease.took_over:
            logger.warning("%s: took over the lease of a dead run (%s)", output, lease.took_over.describe())
        held = HeldRun(plan, start.key, lease, upstream, output, meta, role, progress, started, timings)
        return _convert_held(held, cluster, conversion.unverified, options)


def _sized(plan: Plan, cluster: Cluster, options: dict[str, Any], role: str) -> Plan:
    """The plan with its MoE layers cut into ``cluster.expert_groups``, else into as many expert groups as the Ray
    cluster's slots call for (whole unless they outnumber the jobs)."""
    groups = cluster.expert_groups
    if groups is None:
        slots = worker_slots(options)
        groups = expert_groups_for(plan.jobs, slots)
        if groups > 1:
            get_run_logger().info("%s: the cluster holds %d layer jobs at once, more than the plan's %d: each MoE "
                                  "layer's job cut into %d expert groups (the non-layer job by tensors)", role, slots, len(plan.jobs), groups)
    return split_plan(plan, groups)


@dataclass(frozen=True)
class HeldRun:
    """A run that holds its output's lease: what the steps after it need to know."""

    plan: Any
    key: str
    lease: Any
    upstream: str
    output: str
    meta: dict[str, str]
    role: str
    progress: bool
    started: float
    timings: dict[str, float]


def ray_options(cluster: Cluster) -> dict[str, Any]:
    """What Ray reserves for each layer job and how it places them. A CUDA/ROCm device is visible only to a task
    that reserves a GPU, so ``num_gpus`` defaults to 1 for one. SPREAD: layer jobs are I/O heavy, so use every
    node's network and disk rather than packing them."""
    num_gpus = cluster.num_gpus if cluster.num_gpus is not None else (1 if cluster.device.startswith("cuda") else 0)
    options = {"num_cpus": cluster.num_cpus, "num_gpus": num_gpus, "max_retries": 3, "retry_exceptions": False,
               "scheduling_strategy": "SPREAD"}
    if cluster.resources:
        options["resources"] = dict(cluster.resources)
    return options


def _verify(plan, output: str, options: dict[str, Any]) -> dict[str, Any]:
    """``requant verify`` of ``output``, its shards hashed in parallel as Ray tasks (one process re-reading every
    shard would take hours at K2.6's 600 GB) while this process checks headers, index and config."""
    with remote_options(**options):
        sizes = sorted({(job.output_file, job.bytes_out) for job in plan.jobs})
        groups = [hash_output.submit(output, files) for files in hash_groups(sizes)]
    return verify_checkpoint(output, quote(AwaitedDigests(groups)))


class AwaitedDigests(Mapping):
    """The sha256 by file that hash tasks report, waited for on first use (verification looks last)."""

    def __init__(self, futures: list) -> None:
        self._futures = futures
        self._digests: dict[str, str | None] | None = None

    def _resolved(self) -> dict[str, str | None]:
        if self._digests is None:
            self._digests = {f: d for future in self._futures for f, d in future.result().items()}
        return self._digests

    def __getitem__(self, file: str) -> str | None:
        return self._resolved()[file]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


def _convert_held(held: HeldRun, cluster: Cluster, unverified: bool, options: dict[str, Any]) -> ConvertSummary:
    """The steps of requant.run on Ray, in order: unpublish, the layer jobs and the input hashes as tasks, the
    inputs' record, publish, verify (unpublishing again if that fails)."""
    logger = get_run_logger()
    plan, key, lease, output, role, timings = held.plan, held.key, held.lease, held.output, held.role, held.timings
    recipe = plan.recipe.name
    run.begin_run(output, shards={job.output_file for job in plan.jobs})
    logger.info("%s run %s: %d layer jobs, %.1f MB in, recipe %s", role, key, len(plan.jobs), plan.bytes_in / 1e6, recipe)
    for warning in plan.recipe.warnings:
        logger.warning(warning)

    progress_id = create_progress_artifact(0.0, key=f"{role}-progress", description=f"layer jobs of run {key}")
    with remote_options(**options):
        hashing = [hash_input.submit(held.upstream, files, unverified) for files in hash_groups(list(plan.input_shards))]
        futures = [convert_layer.submit(Sealed(job), job.name, held.upstream, output, key, device=cluster.device,
                                        threads=cluster.threads, lease_generation=lease.generation)
                   for job in plan.jobs]
    outcomes: list[JobOutcome] = []
    with (phase(f"{role}: convert {recipe}", total=len(futures), unit="layer jobs") as shown,
          tqdm(total=len(futures), desc=f"{role} {recipe}", unit=" jobs", disable=not held.progress) as bar):
        for future in as_completed(futures):
            outcomes.append(future.result())
            bar.update(1)
            shown.advance()
            update_progress_artifact(progress_id, 100.0 * len(outcomes) / len(futures))
    convert_seconds = time.perf_counter() - held.started
    timings["jobs"] = convert_seconds - timings["plan"]
    results = [o.result for o in outcomes]
    mark = time.perf_counter()
    with phase(f"{role}: publish and verify") as shown:
        inputs = run.input_record(held.upstream, plan, unverified=unverified,
                                  shards={f: d for group in hashing for f, d in group.result().items()})
        lease.check()
        # quote(): the plan and results describe ~10^5 tensors; Prefect need not walk them for futures
        manifest = publish_checkpoint(quote(plan), quote(results), held.upstream, output, inputs,
                                      held.meta | {"run_key": key}, lease_generation=lease.generation)
        timings["publish"] = time.perf_counter() - mark
        mark = time.perf_counter()
        try:
            verified = _verify(plan, output, options)
        except VerifyError:
            run.begin_run(output)      # unpublish: a prefix that fails verification must not look complete
            raise
        shown.result(f"{output}: {verified.tensors} tensors in {verified.files} files, verified")
    timings["verify"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - held.started
    timings["transcode_sum"] = sum(o.result.seconds for o in outcomes if not o.skipped)
    timings.update(stages.totals(o.result.stages for o in outcomes if not o.skipped))
    timings["upload_sum"] = sum(o.upload_seconds for o in outcomes)
    summary = dataclasses.replace(run.summarize(plan, output, key, outcomes, manifest, timings), manifest=None)
    _artifacts(outcomes, plan, summary, verified, convert_seconds, role)  # the manifest is at the output
    return summary


def _artifacts(outcomes, plan, summary: ConvertSummary, verified: VerifySummary, convert_seconds: float, role: str) -> None:
    output, key = summary.output, summary.run_key
    rows = []
    tensors = {job.output_file: len(job.specs) for job in plan.jobs}
    for o in sorted(outcomes, key=lambda o: o.result.output_file):
        r = o.result
        snrs = [s.snr_db for s in r.stats]
        rows.append({"job": r.job, "tensors": tensors[r.output_file], "bytes_in": r.bytes_in, "bytes_out": r.size,
                     "min_snr_db": round(min(snrs), 2) if snrs else None, "seconds": round(r.seconds, 3),
                     "node": o.node, "skipped": o.skipped, "attempt": o.attempt})
    create_table_artifact(rows, key=f"{role}-jobs", description=f"one row per layer job of run {key}")
    create_link_artifact(object_url(output, MANIFEST_FILE), link_text=f"manifest of {output}", key=f"{role}-manifest")
    create_markdown_artifact(
        "\n".join([
            f"# requantize: {plan.recipe.name}",
            "",
            f"- checkpoint: `{output}` (manifest `{output.rstrip('/')}/{MANIFEST_FILE}`)",
            f"- upstream: `{plan.source}`",
            f"- run key: `{key}`; jobs: {summary.jobs} ({summary.resumed} resumed from an earlier run)",
            f"- verified: {verified.tensors} tensors in {verified.files} files, "
            f"{verified.upstream_tensors} upstream tensors accounted for",
            f"- wall time: {summary.timings['total']:.1f} s (layer jobs {convert_seconds:.1f} s)",
            *([f"- the jobs' stages, summed over their threads: {spent}"] if (spent := stages.describe(summary.timings))
              else []),
            *[f"- **warning:** {w}" for w in plan.recipe.warnings],
        ]),
        key=f"{role}-summary",
    )
