"""The card's Reproduction section: the command that converts the upstream again, and the configuration it writes."""

from __future__ import annotations

import json
from typing import Any

from requant.card.derived import FORMAT_LABELS, builtin_recipe
from requant.card.facts import CardFacts
from requant.constants import MODELOPT_VERSION
from requant.export import ExportFormat, maker
from requant.formats.table import DEFAULT_QUARK
from requant.manifest import HF_QUANT_CONFIG


def convert_command(manifest: dict[str, Any]) -> str:
    up, recipe = manifest["upstream"], manifest["recipe"]
    pinned = up.get("uri", "").startswith("hf://") and up.get("revision") not in (None, "local")
    src = f"hf://{up['id']}@{up['revision']}" if pinned else up.get("uri", "UPSTREAM")
    builtin = recipe.get("source") == f"builtin:{recipe['name']}"
    args = ["requant", "convert", src, f"out/{recipe['name']}", "--recipe",
            recipe["name"] if builtin else recipe.get("source", recipe["name"])]
    if recipe.get("export", ExportFormat.QUARK) == ExportFormat.QUARK:
        args += ["--quark-version", recipe.get("quark_version", DEFAULT_QUARK)]
    if not recipe.get("shared_global_scale", True):
        args.append("--no-shared-global-scale")
    if not recipe.get("fused_excludes", True):
        args.append("--no-fused-excludes")
    if manifest.get("unverified_inputs"):
        args.append("--unverified")
    if not pinned:
        args += ["--upstream-id", up.get("id", "?"), *(["--revision", up["revision"]] if up.get("revision") else [])]
    return " ".join(args)


def section(facts: CardFacts) -> list[str]:
    m = facts.manifest
    versions = ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items()))
    lines = ["## Reproduction", "", f"Upstream: `{m['upstream'].get('id')}` at commit `{m['upstream'].get('revision')}`. "
             f"Converted with {versions}:", "", "```bash", convert_command(m), "```", "",
             f"The tensors equal {maker(m['recipe'])}'s own conversion of the same upstream byte for byte (requant's "
             "tests compare them with its output)."]
    quant = facts.config.get("quantization_config")
    if quant is not None:
        left = (f"{len(quant['exclude'])} excluded modules" if isinstance(quant.get("exclude"), list) else
                f"{len(quant.get('ignore') or ())} ignore patterns" if quant.get("quant_method") != "modelopt" else
                f"{len(quant.get('ignore') or ())} excluded module patterns, as in {HF_QUANT_CONFIG}")
        lines += ["", f"<details><summary>The <code>quantization_config</code> of <code>config.json</code> "
                      f"({left})</summary>", "",
                  "```json", json.dumps(quant, indent=2), "```", "", "</details>"]
    builtin = builtin_recipe(m["recipe"])
    if builtin and builtin[1].quark and m["recipe"]["format"] in FORMAT_LABELS:
        q = builtin[1].quark
        extra = f", layer_config {dict(q.layer_config)}" if q.layer_config else ""
        lines += ["", f"The Quark 0.11 equivalent (LLMTemplate `kimi_k25`): scheme `{q.scheme}`, exclude "
                      f"{', '.join(f'`{p}`' for p in q.exclude)}{extra}."]
    if builtin and builtin[1].llmcompressor and m["recipe"]["format"] in FORMAT_LABELS:
        lc = builtin[1].llmcompressor
        lines += ["", f"The llm-compressor 0.14 equivalent: `model_free_ptq(..., scheme=\"{lc.scheme}\", ignore=[...])` "
                      f"with ignore {', '.join(f'`{p}`' for p in lc.ignore)}."]
    if builtin and builtin[1].modelopt and m["recipe"]["format"] in FORMAT_LABELS:
        mo = builtin[1].modelopt
        lines += ["", f"The Model Optimizer {MODELOPT_VERSION} equivalent: `mtq.quantize(model, config)` (max calibration, "
                      f"no forward loop) with `quant_cfg` = Model Optimizer's `base_disable_all`, then its {mo.scheme} "
                      f"weight quantizer for {', '.join(f'`{p}`' for p in mo.enable)}, then "
                      "`default_disabled_quantizers`; then `export_hf_checkpoint`."]
    return lines
