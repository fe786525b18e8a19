"""``requant bench serve`` (``make bench-serve``): reference-server throughput on the ``tiny`` model, variants side by side.

In-process: prefill tokens/s (one long prompt) and decode tokens/s (greedy, key/value cache) for the
BF16 staging, FP8 reference and MXFP4 variants of the same upstream, plus MXFP4 with its activation
QDQ switched off, which splits MXFP4's cost into weight dequantization (none at run time: done at load)
and activation quantize-dequantize. Over HTTP: lm-eval GSM8K wall time per 100 items against the server.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

import requant
from requant.bench.provenance import CONVERSION, SERVING, describe, run_info, write_results
from requant.serving.checkpoint import load_checkpoint
from requant.serving.model import DeepseekV3Text
from requant.testing.synth import synthesize

# The code these figures measure: the conversions served, the reference server, lm-eval's client.
MEASURES = (*CONVERSION, *SERVING, "requant/bench/serve.py", "requant/evaluation/gsm8k.py")
VARIANTS = ("bf16-staging", "fp8-reference", "kimi-k2.6-mxfp4")


def _rate(fn, tokens: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tokens / median(times)


def model_rates(model: DeepseekV3Text, prompt_len: int, decode_len: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, model.cfg.vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))

    def prefill():
        model.forward(ids, model.new_cache())

    def decode():
        cache = model.new_cache()
        logits = model.forward(ids[:16], cache)
        token = int(logits[-1].argmax())
        for _ in range(decode_len):
            token = int(model.forward(torch.tensor([token]), cache)[-1].argmax())

    return {"prefill_tok_s": _rate(prefill, prompt_len, repeats), "decode_tok_s": _rate(decode, decode_len, repeats)}


def run_bench_serve(out: str | None = None, prompt_len: int = 512, decode_len: int = 128, repeats: int = 3,
                    eval_items: int = 20, gsm8k_dir: str | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"run": run_info(measures=MEASURES), "threads": torch.get_num_threads(),
                               "prompt_len": prompt_len, "decode_len": decode_len}
    with tempfile.TemporaryDirectory(prefix="requant-bench-serve-") as tmp:
        root = Path(tmp)
        upstream = synthesize(root / "tiny", "tiny", seed=0, progress=False)
        rows = []
        for recipe in VARIANTS:
            requant.convert(str(upstream), str(root / recipe), recipe, progress=False)
            model = DeepseekV3Text(load_checkpoint(str(root / recipe)))
            rows.append({"variant": recipe, **model_rates(model, prompt_len, decode_len, repeats)})
        ckpt = load_checkpoint(str(root / "kimi-k2.6-mxfp4"))
        ckpt.activation.update({m: None for m in ckpt.activation})
        rows.append({"variant": "kimi-k2.6-mxfp4 (no activation QDQ)",
                     **model_rates(DeepseekV3Text(ckpt), prompt_len, decode_len, repeats)})
        results["model"] = rows
        if eval_items and gsm8k_dir:
            results["lm_eval"] = _lm_eval_rate(root / "kimi-k2.6-mxfp4", eval_items, gsm8k_dir, root)
    write_results(out, "serve", results, format_results(results))
    return results


def _lm_eval_rate(checkpoint: Path, items: int, gsm8k_dir: str, root: Path) -> dict[str, Any]:
    from requant.engines.engines import launch, load_engines
    from requant.evaluation.gsm8k import run_gsm8k

    with launch(load_engines()["reference"], str(checkpoint), served_model_name="bench", log_dir=root / "logs",
                max_model_len=4096) as server:
        result = run_gsm8k(server.base_url, "bench", variant="bench", seeds=[42], limit=items, gsm8k_dir=gsm8k_dir,
                           out_dir=root / "eval", progress=False)
    seconds = result.wall_seconds["42"]
    samples = [json.loads(line) for line in (root / "eval" / "seed-42" / "samples.jsonl").read_text().splitlines()]
    chars = [len(s["resps"][0][0]) for s in samples if s.get("filter") == "strict-match"]
    return {"items": items, "seconds": seconds, "seconds_per_100_items": 100 * seconds / items,
            "mean_completion_chars": sum(chars) / max(len(chars), 1)}


def format_results(r: dict[str, Any]) -> str:
    lines = [f"# Reference server throughput (tiny model, {r['threads']} torch threads)", "",
             f"Prefill: one {r['prompt_len']}-token prompt; decode: {r['decode_len']} greedy tokens with the key/value cache.",
             "", "| variant | prefill tok/s | decode tok/s | decode vs BF16 |", "|---|---|---|---|"]
    base = r["model"][0]["decode_tok_s"]
    for row in r["model"]:
        lines.append(f"| {row['variant']} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.0f} | "
                     f"{row['decode_tok_s'] / base:.2f}x |")
    if "lm_eval" in r:
        e = r["lm_eval"]
        lines += ["", f"lm-eval GSM8K (3-shot, 1 seed, {e['items']} items) through HTTP on MXFP4: "
                      f"{e['seconds']:.1f} s = {e['seconds_per_100_items']:.0f} s per 100 items "
                      f"(mean completion {e['mean_completion_chars']:.0f} chars; a random model rarely says 'Question:', "
                      "so most items decode the full 256 tokens)."]
    if "run" in r:
        lines += ["", f"Measured {describe(r['run'])}."]
    return "\n".join(lines) + "\n"
