"""``requant verify``: re-read an output checkpoint and check it against its manifest.

Checks: the manifest exists (else the directory is incomplete); every listed file exists with its
size and sha256 and nothing unlisted sits beside them; every shard header parses and holds exactly
the manifest's tensors with their dtypes and shapes; the index agrees; every upstream tensor is
accounted for; the dtypes follow the recipe; config.json carries the right quantization_config;
error statistics are within the recipe's bound.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from requant.errors import CheckpointError, VerifyError
from requant.export import ExportFormat, modelopt, recorded_export, recorded_table
from requant.export.compressed_tensors import SCHEMES
from requant.export.quark import ENGINE_FUSED_MODULES
from requant.formats.table import NO_FORMAT, WEIGHT_FORMATS
from requant.io.safetensors import read_headers
from requant.io.storage import open_storage
from requant.manifest import (
    CONFIG_FILE,
    HF_QUANT_CONFIG,
    INDEX_FILE,
    MANIFEST_FILE,
    is_hub_housekeeping,
    is_run_state,
    sealed_as_stored,
)
from requant.recipe import resolve_target


@dataclass(frozen=True)
class VerifySummary:
    """What a verification checked: output ``files``, ``tensors``, and ``upstream_tensors`` accounted for."""

    files: int
    tensors: int
    upstream_tensors: int


def verify(uri: str, digests: Mapping[str, str | None] | None = None) -> VerifySummary:
    """Check the checkpoint at ``uri`` (a directory or s3://...) against its manifest. ``digests``: sha256 of
    files as read just now elsewhere (the flow reads its shards in parallel on the cluster); every other file is
    hashed here. ``digests`` is consulted last, so a mapping that waits for those reads overlaps them with the
    header, index and config checks."""
    storage = open_storage(uri)
    if not storage.exists(MANIFEST_FILE):
        raise VerifyError([f"{storage.uri}: incomplete: no {MANIFEST_FILE} (the run did not finish or was not published)"])
    where = f"{storage.uri}/{MANIFEST_FILE}"
    raw = storage.read_bytes(MANIFEST_FILE)
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise VerifyError([f"{where}: not valid JSON ({type(exc).__name__}); corrupted or truncated"]) from exc
    if not sealed_as_stored(raw, manifest):
        raise VerifyError([f"{where}: its digest does not match its content (modified or corrupted)"])
    problems: list[str] = []
    for check in (_check_tensors, _check_config):
        try:
            check(storage, manifest, problems)
        except (KeyError, TypeError, AttributeError) as exc:   # a corrupted file with an unexpected structure
            problems.append(f"{storage.uri}: {check.__name__[7:]} check failed on unexpected content "
                            f"({type(exc).__name__}: {str(exc)[:80]})")
    _check_stats(manifest, problems)
    file_problems: list[str] = []
    _check_files(storage, manifest, file_problems, {} if digests is None else digests)
    if file_problems or problems:
        raise VerifyError(file_problems + problems)
    return VerifySummary(len(manifest["outputs"]), len(manifest["tensors"]), len(manifest["sources"]))


def _check_files(storage, manifest: dict, problems: list[str], digests: Mapping[str, str | None]) -> None:
    listed = manifest["outputs"]
    present = set(storage.list_files())
    for rel, info in listed.items():
        where = f"{storage.uri}/{rel}"
        size = storage.size(rel) if rel in present else None
        if size is None:
            problems.append(f"{where}: listed in the manifest but missing")
        elif size != info["size"]:
            problems.append(f"{where}: {size} bytes, manifest says {info['size']}")
        elif (digests.get(rel) or storage.sha256(rel)) != info["sha256"]:
            problems.append(f"{where}: sha256 differs from the manifest (corrupted or modified)")
    for rel in sorted(present - set(listed) - {MANIFEST_FILE}):
        if not (is_run_state(rel) or is_hub_housekeeping(rel)):
            problems.append(f"{storage.uri}/{rel}: not listed in the manifest")


def _check_tensors(storage, manifest: dict, problems: list[str]) -> None:
    tensors = manifest["tensors"]
    seen: dict[str, str] = {}
    for file, got in read_headers(storage, sorted({t["file"] for t in tensors.values()})):
        if isinstance(got, CheckpointError):
            problems.append(f"{storage.uri}/{got}")
            continue
        header, _ = got
        for name, entry in header.items():
            want = tensors.get(name)
            if want is None or want["file"] != file:
                problems.append(f"{file}: {name}: not in the manifest for this file")
            elif (entry.dtype, list(entry.shape)) != (want["dtype"], want["shape"]):
                problems.append(f"{file}: {name}: {entry.dtype}{list(entry.shape)}, manifest says {want['dtype']}{want['shape']}")
            seen[name] = file
    for name, info in tensors.items():
        if name not in seen and storage.exists(info["file"]):
            problems.append(f"{info['file']}: {name}: missing from the shard")
    index = (_json(storage, INDEX_FILE, problems) or {}).get("weight_map")
    if index != {n: t["file"] for n, t in tensors.items()}:
        problems.append(f"{INDEX_FILE}: weight_map disagrees with the manifest's tensors")
    for upstream, outputs in manifest["sources"].items():
        for out in outputs:
            if out not in tensors:
                problems.append(f"upstream tensor {upstream}: output {out} is missing")
    recipe = manifest["recipe"]
    overrides = [tuple(o) for o in recipe.get("overrides", [])]
    table = recorded_table(recipe)
    for module, stat in manifest["stats"].items():
        intended = resolve_target(module, recipe["targets"], overrides)
        want = table.get(stat["target"])
        weight = tensors.get(f"{module}.{want.weight_name}") if want else None
        scale = tensors.get(f"{module}.weight_scale")
        if stat["target"] != intended or want is None or weight is None or scale is None:
            problems.append(f"{module}: quantized as {stat['target']} but the recipe says {intended}, or outputs are missing")
        elif weight["dtype"] != want.weight_dtype or (want.scale_dtype and scale["dtype"] != want.scale_dtype):
            problems.append(f"{module}: weight {weight['dtype']} / scale {scale['dtype']} do not match {stat['target']}")


def _json(storage, name: str, problems: list[str]) -> dict | None:
    """A JSON object from the checkpoint, or None with a problem recorded (corrupted files must not crash verify)."""
    try:
        data = json.loads(storage.read_bytes(name))
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(f"{storage.uri}/{name}: not valid JSON ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{storage.uri}/{name}: not a JSON object")
        return None
    return data


def _check_config(storage, manifest: dict, problems: list[str]) -> None:
    config = _json(storage, CONFIG_FILE, problems)
    if config is None:
        return
    fmt = manifest["recipe"]["format"]
    nested = [k for k, v in config.items() if isinstance(v, dict) and "quantization_config" in v]
    if nested:
        problems.append(f"{CONFIG_FILE}: nested quantization_config left in {nested}")
    quant = config.get("quantization_config")
    if fmt == NO_FORMAT:
        if quant is not None:
            problems.append(f"{CONFIG_FILE}: recipe {manifest['recipe']['name']} quantizes nothing but a quantization_config is present")
        return
    export = recorded_export(manifest["recipe"])
    if export == ExportFormat.COMPRESSED_TENSORS:
        _check_compressed_tensors_config(quant, manifest, problems)
        return
    if export == ExportFormat.MODELOPT:
        _check_modelopt_config(storage, quant, manifest, problems)
        return
    if not quant or quant.get("quant_method") != "quark":
        problems.append(f"{CONFIG_FILE}: missing Quark quantization_config")
        return
    dtype = quant["global_quant_config"]["weight"]["dtype"]
    if WEIGHT_FORMATS[fmt].quark_dtype != dtype:
        problems.append(f"{CONFIG_FILE}: weight dtype {dtype} does not match recipe format {fmt}")
    by_quark_dtype = {f.quark_dtype: name for name, f in WEIGHT_FORMATS.items()}
    layer_configs = quant.get("layer_quant_config") or {}
    for module, stat in manifest["stats"].items():  # Quark's own resolution: first matching pattern, else global
        pattern = next((p for p in layer_configs if fnmatch.fnmatch(module, p)), None)
        spec = layer_configs[pattern] if pattern else quant["global_quant_config"]
        declared = by_quark_dtype.get(((spec or {}).get("weight") or {}).get("dtype"))
        if declared != stat["target"]:
            problems.append(f"{CONFIG_FILE}: {module} is {stat['target']} but the config declares it "
                            f"{declared} ({'layer_quant_config ' + repr(pattern) if pattern else 'global_quant_config'})")
            break
    quantized = set(manifest["stats"])
    wrongly_excluded = quantized & set(quant.get("exclude", []))
    if wrongly_excluded:
        problems.append(f"{CONFIG_FILE}: exclude lists quantized modules, e.g. {sorted(wrongly_excluded)[0]}")
    for name in quant.get("exclude", []):  # an engine would build this fused module BF16 around quantized shards
        parent, _, fused = name.rpartition(".")
        shards = [f"{parent}.{shard}" for shard in ENGINE_FUSED_MODULES.get(fused, ())]
        if any(shard in quantized for shard in shards):
            problems.append(f"{CONFIG_FILE}: exclude lists the fused module {name} but "
                            f"{next(s for s in shards if s in quantized)} is quantized")
            break


def _ignored(module: str, ignore: list) -> bool:
    """compressed-tensors' reading of an ignore list: an exact name, or an ``re:`` pattern matched from the start."""
    return any(isinstance(entry, str) and (re.match(entry[3:], module) is not None if entry.startswith("re:")
                                           else entry == module) for entry in ignore)


def _check_compressed_tensors_config(quant, manifest: dict, problems: list[str]) -> None:
    """The config group declares the recipe's format, and the ignore list leaves every quantized module quantized;
    how compressed-tensors' readers (vLLM, SGLang, transformers) would decide each module."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        problems.append(f"{CONFIG_FILE}: missing compressed-tensors quantization_config")
        return
    fmt = manifest["recipe"]["format"]
    want = SCHEMES[fmt][1]["format"] if fmt in SCHEMES else None
    groups = quant.get("config_groups")
    formats = {g.get("format") for g in groups.values() if isinstance(g, dict)} if isinstance(groups, dict) else set()
    if quant.get("format") != want or formats != {want}:
        problems.append(f"{CONFIG_FILE}: format {quant.get('format')!r} (groups {sorted(map(str, formats))}) does not "
                        f"match recipe format {fmt} ({want})")
    ignore = quant.get("ignore") if isinstance(quant.get("ignore"), list) else []
    if wrongly := sorted(m for m in manifest["stats"] if _ignored(m, ignore)):
        problems.append(f"{CONFIG_FILE}: ignore matches quantized modules, e.g. {wrongly[0]}")
    # targets ["Linear"]: a reader builds every other 2-D weight quantized, unless ignored (or a norm)
    if missed := [m for m in _unquantized_matrices(manifest) if not _ignored(m, ignore)]:
        problems.append(f"{CONFIG_FILE}: ignore misses unquantized modules that readers would build quantized, "
                        f"e.g. {missed[0]} ({len(missed)} in all)")


def _unquantized_matrices(manifest: dict) -> list[str]:
    """The modules whose 2-D ``weight`` the output stores as it is (norms aside): what a reader must be told to
    leave alone."""
    return sorted(module for name, t in manifest["tensors"].items()
                  if name.endswith(".weight") and len(t["shape"]) == 2
                  and (module := name.removesuffix(".weight")) not in manifest["stats"] and not module.endswith("norm"))


def _check_modelopt_config(storage, quant, manifest: dict, problems: list[str]) -> None:
    """hf_quant_config.json declares the recipe's format and config.json carries it in compressed-tensors' shape; its
    exclude_modules leave every quantized module quantized and name every unquantized matrix (how vLLM and SGLang
    decide each module)."""
    hf = _json(storage, HF_QUANT_CONFIG, problems) if storage.exists(HF_QUANT_CONFIG) else None
    if hf is None:
        problems.append(f"{HF_QUANT_CONFIG}: missing or unreadable (a Model Optimizer export declares its format there)")
        return
    fmt = manifest["recipe"]["format"]
    details = hf.get("quantization") if isinstance(hf.get("quantization"), dict) else {}
    want = modelopt.QUANT_ALGOS.get(fmt)
    if want is None or (details.get("quant_algo"), details.get("group_size")) != want:
        problems.append(f"{HF_QUANT_CONFIG}: quant_algo {details.get('quant_algo')!r}, group_size "
                        f"{details.get('group_size')!r} do not match recipe format {fmt} ({want})")
        return
    exclude = details.get("exclude_modules")
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        problems.append(f"{HF_QUANT_CONFIG}: exclude_modules must be a list of strings")
        return
    if quant != modelopt.quantization_config(hf):
        problems.append(f"{CONFIG_FILE}: quantization_config does not carry {HF_QUANT_CONFIG} as Model Optimizer "
                        "writes it")
    if wrongly := sorted(m for m in manifest["stats"] if modelopt.excluded(m, exclude)):
        problems.append(f"{HF_QUANT_CONFIG}: exclude_modules matches quantized modules, e.g. {wrongly[0]}")
    if missed := [m for m in _unquantized_matrices(manifest) if not modelopt.excluded(m, exclude)]:
        problems.append(f"{HF_QUANT_CONFIG}: exclude_modules misses unquantized modules that readers would build "
                        f"quantized, e.g. {missed[0]} ({len(missed)} in all)")


def _check_stats(manifest: dict, problems: list[str]) -> None:
    bound = manifest["recipe"]["min_snr_db"]
    if bound is None:
        return
    for module, stat in manifest["stats"].items():
        if stat["snr_db"] is not None and stat["snr_db"] < bound:
            problems.append(f"{module}: SNR {stat['snr_db']:.2f} dB below the recipe's {bound} dB")
