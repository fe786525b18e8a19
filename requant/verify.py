"""``requant verify``: re-read an output checkpoint and check it against its manifest.

Checks: the manifest exists (else the directory is incomplete); every listed file exists with its
size and sha256 and nothing unlisted sits beside them; every shard header parses and holds exactly
the manifest's tensors with their dtypes and shapes; the index agrees; every upstream tensor is
accounted for; the dtypes follow the recipe; config.json carries the right quantization_config;
error statistics are within the recipe's bound.
"""

from __future__ import annotations

import json
from pathlib import Path

from requant.assemble import MANIFEST_FILE
from requant.errors import CheckpointError, VerifyError
from requant.io.safetensors import read_header, sha256_file
from requant.io.storage import LocalDir
from requant.plan import CONFIG_FILE, INDEX_FILE

# dtypes of a quantized module's outputs, per recipe format
QUANTIZED_DTYPES = {"mxfp4": ("U8", "U8"), "fp8_per_channel": ("F8_E4M3", None)}


def verify(path: str) -> dict:
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise VerifyError([f"{root}: incomplete: no {MANIFEST_FILE} (the run did not finish or was not published)"])
    manifest = json.loads(manifest_path.read_text())
    problems: list[str] = []
    _check_files(root, manifest, problems)
    storage = LocalDir(root)
    _check_tensors(storage, manifest, problems)
    _check_config(root, manifest, problems)
    _check_stats(manifest, problems)
    if problems:
        raise VerifyError(problems)
    return {"files": len(manifest["outputs"]), "tensors": len(manifest["tensors"]), "upstream_tensors": len(manifest["sources"])}


def _check_files(root: Path, manifest: dict, problems: list[str]) -> None:
    listed = manifest["outputs"]
    for rel, info in listed.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {info['size']}")
        elif sha256_file(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified)")
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in listed and rel != MANIFEST_FILE:
            problems.append(f"{path}: not listed in the manifest")


def _check_tensors(storage: LocalDir, manifest: dict, problems: list[str]) -> None:
    tensors = manifest["tensors"]
    seen: dict[str, str] = {}
    for file in sorted({t["file"] for t in tensors.values()}):
        try:
            header, _ = read_header(storage, file)
        except CheckpointError as exc:
            problems.append(f"{storage.uri}/{exc}")
            continue
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
    index = json.loads((Path(storage.uri) / INDEX_FILE).read_text())["weight_map"]
    if index != {n: t["file"] for n, t in tensors.items()}:
        problems.append(f"{INDEX_FILE}: weight_map disagrees with the manifest's tensors")
    for upstream, outputs in manifest["sources"].items():
        for out in outputs:
            if out not in tensors:
                problems.append(f"upstream tensor {upstream}: output {out} is missing")
    fmt = manifest["recipe"]["format"]
    for module, stat in manifest["stats"].items():
        weight, scale = tensors.get(f"{module}.weight"), tensors.get(f"{module}.weight_scale")
        want = QUANTIZED_DTYPES.get(stat["target"])
        if stat["target"] != fmt or want is None or weight is None or scale is None:
            problems.append(f"{module}: quantized as {stat['target']} but the recipe format is {fmt}, or outputs are missing")
        elif weight["dtype"] != want[0] or (want[1] and scale["dtype"] != want[1]):
            problems.append(f"{module}: weight {weight['dtype']} / scale {scale['dtype']} do not match {fmt}")


def _check_config(root: Path, manifest: dict, problems: list[str]) -> None:
    config = json.loads((root / CONFIG_FILE).read_text())
    fmt = manifest["recipe"]["format"]
    nested = [k for k, v in config.items() if isinstance(v, dict) and "quantization_config" in v]
    if nested:
        problems.append(f"{CONFIG_FILE}: nested quantization_config left in {nested}")
    quant = config.get("quantization_config")
    if fmt == "none":
        if quant is not None:
            problems.append(f"{CONFIG_FILE}: recipe {manifest['recipe']['name']} quantizes nothing but a quantization_config is present")
        return
    if not quant or quant.get("quant_method") != "quark":
        problems.append(f"{CONFIG_FILE}: missing Quark quantization_config")
        return
    dtype = quant["global_quant_config"]["weight"]["dtype"]
    if {"mxfp4": "fp4", "fp8_per_channel": "fp8_e4m3"}[fmt] != dtype:
        problems.append(f"{CONFIG_FILE}: weight dtype {dtype} does not match recipe format {fmt}")
    quantized = set(manifest["stats"])
    wrongly_excluded = quantized & set(quant.get("exclude", []))
    if wrongly_excluded:
        problems.append(f"{CONFIG_FILE}: exclude lists quantized modules, e.g. {sorted(wrongly_excluded)[0]}")


def _check_stats(manifest: dict, problems: list[str]) -> None:
    bound = manifest["recipe"]["min_snr_db"]
    if bound is None:
        return
    for module, stat in manifest["stats"].items():
        if stat["snr_db"] is not None and stat["snr_db"] < bound:
            problems.append(f"{module}: SNR {stat['snr_db']:.2f} dB below the recipe's {bound} dB")
