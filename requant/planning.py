"""Planning: read config.json, the index and every shard header (never tensor data), validate all of
it, and cut the model into layer jobs. All problems are reported together, before any conversion.
"""

from __future__ import annotations

import dataclasses
import gc
import re
from collections import defaultdict
from dataclasses import dataclass

from requant.constants import INT4_GROUP_SIZE, MX_BLOCK_SIZE, UE8M0_SCALE_FMT
from requant.errors import CheckpointError, PlanError
from requant.export import OutputModules
from requant.export.global_scales import global_scale_group
from requant.export.quark import is_quark_linear_weight
from requant.formats.nvfp4 import NVFP4_GROUP
from requant.formats.source import (
    DECODED_DTYPE,
    DROPPED_PARAMS,
    MODULE_PARAMS,
    Source,
    detect_source,
    expected_params,
    stored_as,
)
from requant.formats.table import DEFAULT_TABLE, FORMAT_TABLES, UNQUANTIZED, WeightFormat
from requant.io.paths import check_relative
from requant.io.safetensors import TensorEntry, TensorSpec, frozen_builder, read_headers
from requant.io.storage import Storage
from requant.layout import (
    ENGINE_UNQUANTIZED,
    ModelConfig,
    classify,
    expected_modules,
    fused_layer,
    in_mtp_layer,
    is_carried_buffer,
    layer_of,
    load_config,
    routed_expert,
    router_bias_expected,
)
from requant.manifest import (
    CONFIG_FILE,
    EVAL_DIR,
    HF_QUANT_CONFIG,
    INDEX_FILE,
    MANIFEST_FILE,
    MODEL_CARD,
    SINGLE_SHARD,
    UPSTREAM_CARD,
    is_run_state,
    read_weight_map,
)
from requant.recipe import NEVER_QUANTIZED, Recipe

FLOAT_DTYPES = ("BF16", "F16", "F32")
NON_LAYER_JOB = "non-layer"


@dataclass(frozen=True)
class TensorTask:
    """One unit of work inside a job: a module to transcode, or one tensor to copy verbatim.

    kind: "copy" (bytes out == bytes in), "dense" (a high-precision ``weight`` to quantize), or how the module is
    stored quantized upstream ("int4", "fp8_block", "mxfp4": ``requant.formats.source.MODULE_PARAMS``).
    ``inputs`` are the upstream tensors it reads.
    """

    name: str
    kind: str
    target: str
    inputs: tuple[TensorEntry, ...]
    shape: tuple[int, ...]
    outputs: tuple[TensorSpec, ...]
    table: str = DEFAULT_TABLE  # the format table whose bytes it reproduces (requant.formats.table.FORMAT_TABLES)
    block: tuple[int, int] | None = None  # fp8_block: the upstream's weight_block_size
    pow2_scales: bool = False  # fp8_block: the upstream declares scale_fmt ue8m0 (every scale a power of two)
    # the inputs of the modules that share its global scale (NVFP4), as stored (MODULE_PARAMS order), module by module:
    # read with its own, only for their largest magnitude
    partners: tuple[TensorEntry, ...] = ()

    @property
    def bytes_in(self) -> int:
        return sum(e.nbytes for e in self.inputs)

    @property
    def bytes_held(self) -> int:
        """The memory it holds from read to written: its inputs (its partners' too), and its outputs unless it copies
        (a copy writes the tensor it read; a decoded FP8 weight is twice its input)."""
        return (self.bytes_in + sum(e.nbytes for e in self.partners)
                + (0 if self.kind == "copy" else sum(s.nbytes for s in self.outputs)))

    @property
    def format(self) -> WeightFormat | None:
        """The format row of its target (None: unquantized)."""
        return FORMAT_TABLES[self.table].get(self.target)


@dataclass(frozen=True)
class LayerJob:
    """Everything one worker does for one decoder layer (or for the non-layer tensors)."""

    index: int
    name: str
    output_file: str
    tasks: tuple[TensorTask, ...]

    @property
    def specs(self) -> list[TensorSpec]:
        return [spec for task in self.tasks for spec in task.outputs]

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tasks)

    @property
    def bytes_out(self) -> int:
        """Size of the output shard's tensor data (the header adds a few KB)."""
        return sum(spec.nbytes for spec in self.specs)

    def __reduce__(self):
        # A job travels to its Ray worker pickled. As plain tuples it pickles and loads in about a third of the
        # time of its thousands of dataclass instances (pickle calls Ray's Python-level reducer hook on each of
        # those, never on a tuple or a string), and the worker rebuilds the instances without their __init__.
        return _unpack_job, (self.index, self.name, self.output_file, tuple(map(_task_row, self.tasks)))


def _task_row(task: TensorTask) -> tuple:
    return (task.name, task.kind, task.target, task.shape,
            tuple((e.name, e.file, e.dtype, e.shape, e.start, e.end) for e in task.inputs),
            tuple((s.name, s.dtype, s.shape) for s in task.outputs), task.table, task.block, task.pow2_scales,
            tuple((e.name, e.file, e.dtype, e.shape, e.start, e.end) for e in task.partners))


def _unpack_job(index: int, name: str, output_file: str, rows: tuple) -> LayerJob:
    entry, spec, task = frozen_builder(TensorEntry), frozen_builder(TensorSpec), frozen_builder(TensorTask)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ~10^4 objects per job, none of them in a cycle
    try:
        tasks = tuple(task((n, kind, target, tuple(map(entry, inputs)), shape, tuple(map(spec, outputs)), table, block,
                            pow2, tuple(map(entry, partners))))
                      for n, kind, target, shape, inputs, outputs, table, block, pow2, partners in rows)
    finally:
        if gc_was_enabled:
            gc.enable()
    return LayerJob(index, name, output_file, tasks)


@dataclass(frozen=True)
class Plan:
    source: str
    recipe: Recipe
    config: ModelConfig
    jobs: tuple[LayerJob, ...]
    input_shards: tuple[tuple[str, int], ...]  # (file, size)
    extra_files: tuple[str, ...]  # copied byte for byte
    excluded_modules: tuple[str, ...]  # Quark "exclude": linear weights left unquantized
    source_format: Source  # what config.json declares, checked against the tensors
    expert_groups: int = 1  # each MoE layer's job cut into this many jobs of consecutive experts (split_plan)

    @property
    def bytes_in(self) -> int:
        return sum(size for _, size in self.input_shards)


def output_modules(plan: Plan) -> OutputModules:
    """What the output stores quantized and what it leaves as it is, by module, for the writers' configs."""
    quantized, unquantized = set(), set()
    for job in plan.jobs:
        for task in job.tasks:
            if task.target != UNQUANTIZED:
                quantized.add(task.name)
                continue
            for spec in task.outputs:
                module, _, param = spec.name.rpartition(".")
                if param == "weight" and len(spec.shape) >= 2 and not module.endswith("norm"):
                    unquantized.add(module)
    return OutputModules(tuple(sorted(quantized)), plan.excluded_modules, tuple(sorted(unquantized)))


def build_plan(storage: Storage, recipe: Recipe, expert_groups: int = 1) -> Plan:
    """The plan converting ``storage`` with ``recipe``: every header read and every problem found before any tensor
    is converted; ``expert_groups`` > 1 cuts each MoE layer's job into that many (:func:`split_plan`)."""
    plan = split_plan(_build_plan(storage, recipe), expert_groups)
    # A K2.6 plan is ~10^6 small immutable objects; keep the cyclic GC from rescanning them forever.
    gc.collect()
    gc.freeze()
    return plan


def _build_plan(storage: Storage, recipe: Recipe) -> Plan:
    where = f"{storage.uri}/{CONFIG_FILE}"
    config = load_config(storage.read_bytes(CONFIG_FILE), where)
    source = detect_source(config.quantization, where)
    problems: list[str] = []
    weight_map, shards = _weight_map(storage, problems)
    entries, readable = _headers(storage, shards, weight_map, problems)
    # tensors the index puts in a missing or unreadable shard were reported once, with their shard
    unreadable = {name for name, file in weight_map.items() if file not in readable}
    try:
        tasks = _tasks(config, recipe, source, entries, unreadable, problems)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        # config.json is untrusted input; a field of an unexpected type or size surfaces here
        raise CheckpointError(where, f"text config has an unexpected structure ({type(exc).__name__}: {exc})") from exc
    _check_fused(tasks, recipe, problems)
    if recipe.format_table != DEFAULT_TABLE:
        tasks = [_for_table(t, recipe.format_table) for t in tasks]
        tasks = share_global_scales(tasks, recipe)
    covered = {e.name for t in tasks for e in t.inputs}
    covered |= _dropped(entries, covered, source)
    if recipe.mtp == "drop":  # read and checked like every tensor, then left out of the output
        tasks = [t for t in tasks if not in_mtp_layer(t.inputs[0].name, config)]
    if not problems:
        problems += [f"{entries[n].file}: {n}: not covered by recipe {recipe.name}" for n in sorted(entries.keys() - covered)]
    problems = [p if p.startswith(storage.uri) else f"{storage.uri}/{p}" for p in problems]
    if problems:
        raise PlanError(problems)
    files = set(storage.list_files())
    bad_names = []
    for f in sorted(files):                      # names come from the store; copies must not escape the output
        try:
            check_relative(f, f"{storage.uri}/{f}")
        except CheckpointError as exc:
            bad_names.append(str(exc))
    if bad_names:
        raise PlanError(bad_names)
    # an upstream's hf_quant_config.json describes its quantization like config.json's quantization_config does:
    # never copied (a Model Optimizer export writes its own)
    extra = tuple(sorted(f for f in files if not f.endswith(".safetensors")
                         and f not in (INDEX_FILE, CONFIG_FILE, HF_QUANT_CONFIG)
                         and not _describes_the_upstream_as_output(f, files)))
    stray = sorted(f for f in files if f.endswith(".safetensors") and f not in shards)
    if stray:
        raise PlanError([f"{storage.uri}/{f}: shard is not referenced by {INDEX_FILE}" for f in stray])
    jobs = _jobs(tasks, config)
    excluded = tuple(sorted(
        spec.name.rsplit(".", 1)[0]
        for job in jobs for task in job.tasks if task.target == UNQUANTIZED
        for spec in task.outputs if is_quark_linear_weight(spec.name)
        and (recipe.format_table == DEFAULT_TABLE or len(spec.shape) >= 2)  # 0.13 also checks the shape
    ))
    sizes = tuple((f, readable[f]) for f in shards)
    return Plan(storage.uri, recipe, config, jobs, sizes, extra, excluded, source)


def _dropped(entries: dict[str, TensorEntry], covered: set[str], source: Source) -> set[str]:
    """The tensors of converted modules that no target needs (``DROPPED_PARAMS``: a W4A4 release's input_scale),
    read past and left out of the output."""
    dropped = DROPPED_PARAMS.get(source.quantized_kind or "", ())
    modules = {name.rpartition(".")[0] for name in covered}
    return {name for name in entries if name.rpartition(".")[2] in dropped and name.rpartition(".")[0] in modules}


def _describes_the_upstream_as_output(name: str, files: set[str]) -> bool:
    """A file of an upstream that is itself a requant output (e.g. ct-nvfp4a16 converted again) which describes that
    output and would be wrong beside the new one: its manifest, run state and evaluation reports, and, when it has
    a model card of its own, the card of its upstream."""
    return (name == MANIFEST_FILE or is_run_state(name) or name.startswith(f"{EVAL_DIR}/")
            or (name == UPSTREAM_CARD and MODEL_CARD in files))


def _weight_map(storage: Storage, problems: list[str]) -> tuple[dict[str, str], list[str]]:
    where = f"{storage.uri}/{INDEX_FILE}"
    weight_map = read_weight_map(storage)
    if weight_map is None:
        if storage.exists(SINGLE_SHARD):
            return {}, [SINGLE_SHARD]
        raise CheckpointError(where, "missing (and there is no single model.safetensors)")
    shards = []
    for file in sorted(set(weight_map.values())):
        try:
            check_relative(file, where)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if not storage.exists(file):
            problems.append(f"{where}: names {file}, which does not exist")
            continue
        shards.append(file)
    return weight_map, shards


def _headers(storage: Storage, shards: list[str], weight_map: dict[str, str], problems: list[str]) -> tuple[dict[str, TensorEntry], dict[str, int]]:
    """Every shard's header, in shard order; and the size of each shard whose header is valid."""
    entries: dict[str, TensorEntry] = {}
    readable: dict[str, int] = {}
    for file, got in read_headers(storage, shards):
        if isinstance(got, CheckpointError):
            problems.append(f"{storage.uri}/{got}")
            continue
        header, readable[file] = got
        _add_entries(storage, file, header, weight_map, entries, problems)
    for name, file in weight_map.items():
        if file in readable and name not in entries:
            problems.append(f"{storage.uri}/{file}: {name}: listed in the index but missing from the shard")
    return entries, readable


def _add_entries(storage: Storage, file: str, header: dict[str, TensorEntry], weight_map: dict[str, str],
                 entries: dict[str, TensorEntry], problems: list[str]) -> None:
    for name, entry in header.items():
        if weight_map and weight_map.get(name) != file:
            problems.append(f"{storage.uri}/{file}: {name}: in this shard but the index says {weight_map.get(name)!r}")
        elif name in entries:
            problems.append(f"{storage.uri}/{file}: {name}: also stored in {entries[name].file}")
        else:
            entries[name] = entry


def _tasks(config: ModelConfig, recipe: Recipe, source: Source, entries: dict[str, TensorEntry], unreadable: set[str],
           problems: list[str]) -> list[TensorTask]:
    by_module: dict[str, dict[str, TensorEntry]] = defaultdict(dict)
    for name, entry in entries.items():
        module, _, param = name.rpartition(".")
        by_module[module][param] = entry
    expected = expected_modules(config)
    tasks: list[TensorTask] = []
    consumed: dict[str, set[str]] = {}  # module -> the tensors its task reads
    for module, shape in expected.items():
        params = by_module.get(module)
        if not params and any(f"{module}.{p}" in unreadable for names in MODULE_PARAMS.values() for p in names):
            continue
        if not params:
            problems.append(f"{module}: missing (config.json implies a weight of shape {list(shape)})")
            continue
        task = _module_task(module, shape, params, recipe, source, problems, in_mtp_layer(module, config))
        if task:
            tasks.append(task)
            consumed[module] = {e.name.rpartition(".")[2] for e in task.inputs}
    if router_bias_expected(config):
        for module in (m for m in expected if m.endswith(".mlp.gate")):
            bias = by_module.get(module, {}).get("e_score_correction_bias")
            if bias is None and f"{module}.e_score_correction_bias" in unreadable:
                continue
            if bias is None:
                problems.append(f"{module}.e_score_correction_bias: missing (topk_method noaux_tc needs it)")
            elif bias.shape != (expected[module][0],) or bias.dtype not in FLOAT_DTYPES:
                problems.append(f"{bias.file}: {bias.name}: {bias.dtype}{list(bias.shape)}, config implies a float [{expected[module][0]}]")
            else:
                tasks.append(_copy_task(bias))
    for module, params in by_module.items():
        known: set[str] = set()
        if module in expected:
            # a module that was refused reported its own problem; its tensors are not "unexpected" on top of it
            known = consumed.get(module, set(params))
            if module in consumed:  # what no target needs of its storage (a W4A4 release's input_scale)
                known = known | set(DROPPED_PARAMS.get(source.quantized_kind or "", ()))
        if module in expected and module.endswith(".mlp.gate"):
            known.add("e_score_correction_bias")
        for param, entry in params.items():
            if param in known:
                continue
            if is_carried_buffer(entry.name, config):
                tasks.append(_copy_task(entry))
                continue
            cls = classify(module)
            if module in expected or cls not in ("vision_tower", "mm_projector"):
                problems.append(f"{entry.file}: {entry.name}: unexpected tensor (not implied by config.json)")
                continue
            tasks.append(_vision_task(entry, recipe, problems))
    return tasks


def _module_task(module: str, shape: tuple[int, ...], params: dict[str, TensorEntry], recipe: Recipe,
                 source: Source, problems: list[str], mtp: bool = False) -> TensorTask | None:
    cls = classify(module)
    target = recipe.target_for(module, cls, in_mtp_layer=mtp)
    if target != UNQUANTIZED and cls in NEVER_QUANTIZED:
        problems.append(f"recipe {recipe.name}: an override targets {module} ({cls}) with {target}; "
                        f"Quark's export keeps norms and embeddings unquantized")
        return None
    if target != UNQUANTIZED and cls in ENGINE_UNQUANTIZED:
        problems.append(f"recipe {recipe.name}: an override targets {module} ({cls}) with {target}; "
                        f"vLLM and SGLang build it unquantized")
        return None
    kind = stored_as(set(params), {p: e.dtype for p, e in params.items()})
    if kind != "dense":
        return _quantized_source_task(module, shape, params, kind, target, source, problems)
    weight = params.get("weight")
    if weight is None:
        problems.append(f"{module}.weight: missing")
        return None
    if weight.shape != shape:
        problems.append(f"{weight.file}: {weight.name}: shape {list(weight.shape)}, config implies {list(shape)}")
        return None
    if weight.dtype not in FLOAT_DTYPES:
        problems.append(f"{weight.file}: {weight.name}: dtype {weight.dtype}, expected one of {FLOAT_DTYPES}")
        return None
    if target == UNQUANTIZED:
        return _copy_task(weight)
    if not _quantizable(weight.name, weight.file, shape, problems):
        return None
    return TensorTask(module, "dense", target, (weight,), shape, _quantized_outputs(module, shape, target, weight.dtype))


def _quantized_source_task(module: str, shape: tuple[int, ...], params: dict[str, TensorEntry], kind: str,
                           target: str, source: Source, problems: list[str]) -> TensorTask | None:
    """A module stored quantized upstream (``kind``: int4, fp8_block, mxfp4), its tensors checked against what the
    config declares and implies."""
    names = MODULE_PARAMS[kind]
    anchor = next(iter(params.values()))
    if kind != source.quantized_kind:
        problems.append(f"{anchor.file}: {module}: stored as {kind} ({', '.join(sorted(params))}), but config.json "
                        f"declares {source.format.value} ({source.format.description})")
        return None
    missing = [s for s in names if s not in params]
    if missing:
        problems.append(f"{anchor.file}: {module}: has {', '.join(sorted(params))} but not {', '.join(missing)}")
        return None
    entries = tuple(params[s] for s in names)
    out, inp = shape
    ok = True
    group = {"int4": INT4_GROUP_SIZE, "mxfp4": MX_BLOCK_SIZE, "nvfp4": NVFP4_GROUP, "nvfp4_modelopt": NVFP4_GROUP}.get(kind)
    if group and inp % group:
        problems.append(f"{entries[0].file}: {entries[0].name}: input dimension {inp} is not a multiple of {group}")
        ok = False
    for entry, (dtypes, want) in zip(entries, expected_params(kind, shape, source).values()):
        if entry.dtype not in dtypes or entry.shape != want:
            problems.append(f"{entry.file}: {entry.name}: {entry.dtype}{list(entry.shape)}, config implies "
                            f"{'/'.join(dtypes)}{list(want)}")
            ok = False
    if ok and target != UNQUANTIZED:
        ok = _quantizable(f"{module}.weight", entries[0].file, shape, problems)
    if not ok:
        return None
    outputs = _quantized_outputs(module, shape, target, DECODED_DTYPE)
    return TensorTask(module, kind, target, entries, shape, outputs, block=source.block,
                      pow2_scales=source.scale_fmt == UE8M0_SCALE_FMT)


def _quantizable(name: str, file: str, shape: tuple[int, ...], problems: list[str]) -> bool:
    if len(shape) != 2 or shape[1] % MX_BLOCK_SIZE:
        problems.append(f"{file}: {name}: shape {list(shape)}: input dimension is not a multiple of {MX_BLOCK_SIZE}")
        return False
    return True


def _for_table(task: TensorTask, table: str) -> TensorTask:
    """``task`` reproducing another format table's bytes (another Quark release, or compressed-tensors): the same
    work, that table's output tensors."""
    fmt = FORMAT_TABLES[table].get(task.target)
    if fmt is None:
        return dataclasses.replace(task, table=table)
    hp_dtype = task.inputs[0].dtype if task.kind == "dense" else DECODED_DTYPE  # a quantized source decodes to BF16
    return dataclasses.replace(task, table=table, outputs=fmt.output_specs(task.name, task.shape, hp_dtype))


def share_global_scales(tasks: list[TensorTask], recipe: Recipe) -> list[TensorTask]:
    """Each task of a format with a global scale (NVFP4) given the inputs of the other modules of its group
    (``requant.export.global_scales.global_scale_group``: the engines' fused sets by default, llm-compressor's
    with ``shared_global_scale: false``), in module order; groups of one module stay as they are."""
    groups: dict[tuple, list[TensorTask]] = defaultdict(list)
    for task in tasks:
        fmt = task.format
        if task.kind != "copy" and fmt is not None and fmt.encode_shared is not None:
            key = global_scale_group(task.name, recipe.shared_global_scale)
            if key is not None:
                groups[key + (task.target, task.kind)].append(task)
    partners: dict[str, tuple[TensorEntry, ...]] = {}
    for members in groups.values():
        for task in members:
            partners[task.name] = tuple(e for other in sorted(members, key=lambda t: t.name) if other is not task
                                        for e in other.inputs)
    return [dataclasses.replace(t, partners=partners[t.name]) if partners.get(t.name) else t for t in tasks]


def _quantized_outputs(module: str, shape: tuple[int, ...], target: str, hp_dtype: str) -> tuple[TensorSpec, ...]:
    if target in FORMAT_TABLES[DEFAULT_TABLE]:
        return FORMAT_TABLES[DEFAULT_TABLE][target].output_specs(module, shape, hp_dtype)
    return (TensorSpec(f"{module}.weight", hp_dtype, shape),)


def _copy_task(entry: TensorEntry) -> TensorTask:
    return TensorTask(entry.name, "copy", UNQUANTIZED, (entry,), entry.shape, (TensorSpec(entry.name, entry.dtype, entry.shape),))


def _vision_task(entry: TensorEntry, recipe: Recipe, problems: list[str]) -> TensorTask:
    module, _, param = entry.name.rpartition(".")
    target = recipe.target_for(module)
    if target == UNQUANTIZED or param != "weight" or not is_quark_linear_weight(entry.name) or len(entry.shape) != 2:
        return _copy_task(entry)
    _quantizable(entry.name, entry.file, entry.shape, problems)
    return TensorTask(module, "dense", target, (entry,), entry.shape, _quantized_outputs(module, entry.shape, target, entry.dtype))


def _check_fused(tasks: list[TensorTask], recipe: Recipe, problems: list[str]) -> None:
    """vLLM loads some modules into one fused layer (see ``layout.FUSED_LAYERS``) that has one quantization method:
    a recipe that gives the parts different targets cannot load there, so it is refused before converting."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for task in tasks:
        if task.kind in ("int4", "dense") or is_quark_linear_weight(task.name):
            module = task.name if task.kind in ("int4", "dense") else task.name.rsplit(".", 1)[0]
            fused = fused_layer(module)
            if fused is not None:
                groups[fused][module] = task.target
    for fused, parts in sorted(groups.items()):
        if len(set(parts.values())) > 1:
            shown = ", ".join(f"{m} -> {t}" for m, t in sorted(parts.items())[:4])
            problems.append(f"recipe {recipe.name}: vLLM fuses these modules into one layer {fused} with a single "
                            f"quantization method, but the recipe gives them different targets: {shown}")


def _jobs(tasks: list[TensorTask], config: ModelConfig) -> tuple[LayerJob, ...]:
    groups: dict[int | None, list[TensorTask]] = defaultdict(list)
    for task in tasks:
        groups[layer_of(task.inputs[0].name, config.prefix)].append(task)
    keys = sorted(groups, key=lambda k: -1 if k is None else k)
    total = len(keys)
    jobs = []
    for i, key in enumerate(keys):
        name = NON_LAYER_JOB if key is None else f"layer-{key:03d}"
        ordered = tuple(sorted(groups[key], key=lambda t: t.name))
        jobs.append(LayerJob(i, name, shard_name(i, total), ordered))
    return tuple(jobs)


def shard_name(index: int, total: int) -> str:
    """The output shard of job ``index`` (from 0) of ``total``, as save_pretrained names its shards."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def is_shard_name(name: str) -> bool:
    """Whether ``name`` (relative to the output) is named as :func:`shard_name` names an output shard."""
    return _SHARD_NAME.fullmatch(name) is not None


def split_plan(plan: Plan, expert_groups: int) -> Plan:
    """``plan`` with each MoE layer's job cut into ``expert_groups`` jobs of consecutive experts, and the non-layer
    job into as many by whole tensors (:func:`split_jobs`): the same tensors in more, smaller jobs and output shards,
    so that more workers than layers stay busy. The split is part of the run's identity (its key): it names the
    shards."""
    if expert_groups == plan.expert_groups:
        return plan
    if plan.expert_groups != 1:
        raise ValueError(f"the plan is already split into {plan.expert_groups} expert groups")
    return dataclasses.replace(plan, jobs=split_jobs(plan.jobs, expert_groups), expert_groups=expert_groups)


def expert_groups_of(experts: list[int], parts: int) -> list[list[int]]:
    """``experts`` (sorted) in at most ``parts`` groups of consecutive experts, as even in count as whole experts
    allow (none empty)."""
    groups = [experts[len(experts) * k // parts:len(experts) * (k + 1) // parts] for k in range(parts)]
    return [g for g in groups if g]


def tensor_bins(sizes: list[int], parts: int) -> list[list[int]]:
    """The indices of ``sizes`` in at most ``parts`` bins of about equal sums (largest first into the lightest bin,
    the first among equals), each bin in index order, none empty."""
    bins: list[list[int]] = [[] for _ in range(max(1, min(parts, len(sizes))))]
    sums = [0] * len(bins)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = sums.index(min(sums))
        bins[k].append(i)
        sums[k] += sizes[i]
    return [sorted(b) for b in bins if b]


def _split_by_tensors(job: LayerJob) -> bool:
    """Whether :func:`split_jobs` cuts ``job`` by whole tensors: the non-layer job, when it holds more than one."""
    return job.name == NON_LAYER_JOB and len(job.tasks) > 1


def _splittable(job: LayerJob) -> list[int]:
    """The routed experts of ``job`` when it can be split (two or more), else []."""
    experts = sorted({e for t in job.tasks if (e := routed_expert(t.name)) is not None})
    return experts if len(experts) >= 2 else []


def split_jobs(jobs: tuple[LayerJob, ...], parts: int) -> tuple[LayerJob, ...]:
    """Each job holding routed experts cut into ``parts`` jobs of consecutive experts (:func:`expert_groups_of`; the
    layer's other tensors stay with the first), the non-layer job (embeddings, head, vision tower) into up to
    ``parts`` jobs of whole tensors (:func:`tensor_bins`), every job renumbered with its own output shard. Other jobs
    are kept whole."""
    if parts < 1:
        raise ValueError(f"expert groups must be at least 1, got {parts}")
    pieces: list[tuple[str, tuple[TensorTask, ...]]] = []
    for job in jobs:
        experts = _splittable(job) if parts > 1 else []
        if experts:
            groups = expert_groups_of(experts, parts)
            group_of = {e: k for k, group in enumerate(groups) for e in group}
            members: list[list[TensorTask]] = [[] for _ in groups]
            for task in job.tasks:
                expert = routed_expert(task.name)
                members[0 if expert is None else group_of[expert]].append(task)
            pieces += [(f"{job.name}-experts-{g[0]:03d}-{g[-1]:03d}", tuple(tasks)) for g, tasks in zip(groups, members)]
        elif parts > 1 and _split_by_tensors(job):
            bins = tensor_bins([t.bytes_in for t in job.tasks], parts)
            pieces += [(f"{job.name}-{k + 1}-of-{len(bins)}", tuple(job.tasks[i] for i in b)) for k, b in enumerate(bins)]
        else:
            pieces.append((job.name, job.tasks))
    total = len(pieces)
    return tuple(LayerJob(i, name, shard_name(i, total), tasks) for i, (name, tasks) in enumerate(pieces))


@dataclass(frozen=True)
class JobShape:
    """A job's input bytes as :func:`split_jobs` divides them: outside its routed experts, per expert in order, and
    for the non-layer job per tensor in order."""

    rest: int
    experts: tuple[int, ...]
    tensors: tuple[int, ...] = ()


def job_shapes(jobs: tuple[LayerJob, ...]) -> list[JobShape]:
    shapes = []
    for job in jobs:
        if _split_by_tensors(job):
            shapes.append(JobShape(0, (), tuple(t.bytes_in for t in job.tasks)))
            continue
        per_expert: dict[int, int] = defaultdict(int)
        rest = 0
        splittable = set(_splittable(job))
        for task in job.tasks:
            expert = routed_expert(task.name)
            if expert in splittable:
                per_expert[expert] += task.bytes_in
            else:
                rest += task.bytes_in
        shapes.append(JobShape(rest, tuple(per_expert[e] for e in sorted(per_expert))))
    return shapes


def split_sizes(shapes: list[JobShape], parts: int) -> list[int]:
    """The input bytes of each job ``split_jobs(jobs, parts)`` makes, in order, from ``job_shapes(jobs)``: what a
    scheduler needs to weigh a split without building its jobs."""
    sizes = []
    for shape in shapes:
        if parts > 1 and shape.experts:
            groups = expert_groups_of(list(range(len(shape.experts))), parts)
            sizes += [sum(shape.experts[i] for i in g) + (shape.rest if k == 0 else 0) for k, g in enumerate(groups)]
        elif parts > 1 and shape.tensors:
            sizes += [sum(shape.tensors[i] for i in b) for b in tensor_bins(list(shape.tensors), parts)]
        else:
            sizes.append(shape.rest + sum(shape.experts) + sum(shape.tensors))
    return sizes
