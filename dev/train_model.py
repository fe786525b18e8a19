"""make train-model: train the small Kimi-K2.6-shaped model on the arithmetic task and write its assets.

Everything is seeded and runs on CPU in minutes: the data splits (requant.trained.task), a tokenizer with
single-digit tokens, transformers' DeepseekV3ForCausalLM built from exactly the text config `requant synth
--profile trained` writes (MLA 512/64/128/128, sigmoid noaux_tc router, 1 shared + 8 routed experts, layer 0
dense), AdamW on freshly generated training problems laid out as lm-eval's few-shot prompts, and DeepSeek's
auxiliary-loss-free balancing (the router's e_score_correction_bias nudged towards equal expert load). The
result goes to requant/trained/assets/: model.safetensors (BF16, checkpoint names), tokenizer files,
train.jsonl / test.jsonl (GSM8K schema), training.json (settings, loss curve, accuracy, seconds) and
SHA256SUMS. Tests and `make flow-run` use these files; they never train.

    python -m dev.train_model [--steps 1500] [--out DIR]
    python -m dev.train_model --check   # a short seeded run that must reproduce its own loss curve
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from requant.synth import PROFILES, text_config
from requant.tokenizer import write_tokenizer
from requant.trained import task

ASSETS = Path(task.__file__).resolve().parent / "assets"
PROFILE = PROFILES["trained"]
N_TRAIN, N_TEST = 7473, 1319  # GSM8K's split sizes
SHOTS = 3                      # the evaluation's few-shot count; training sequences hold SHOTS + 1 problems


def hf_config(bos: int, eos: int):
    from transformers import DeepseekV3Config

    text = text_config(PROFILE, bos, eos)
    config = DeepseekV3Config(**{k: v for k, v in text.items()
                                 if k not in ("quantization_config", "architectures", "model_type")})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The trained weights under the checkpoint's own names (per-expert gate/up/down), BF16 (biases FP32)."""
    out = {}
    inter = PROFILE.moe_intermediate
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or "original_inv_freq" in name:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix(".gate_up_proj")
            for e in range(tensor.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = tensor[e, :inter]
                out[f"{base}.{e}.up_proj.weight"] = tensor[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return {k: (v.float() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous()
            for k, v in out.items()}


def batches(tok: Tokenizer, seed: int, batch: int, pad: int):
    """Endless batches of SHOTS + 1 fresh training problems per sequence, laid out as lm-eval lays out a prompt."""
    problems = task.stream(seed, "train")
    while True:
        seqs = [tok.encode(task.few_shot_text([next(problems) for _ in range(SHOTS + 1)])).ids for _ in range(batch)]
        width = max(map(len, seqs))
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(s)] = torch.tensor(s)
        yield ids, labels


@torch.no_grad()
def accuracy(model, tok: Tokenizer, shots: list[dict], items: list[dict], max_new: int = 64) -> float:
    """Greedy 3-shot accuracy on ``items`` (the answer after '#### ' must equal the reference's)."""
    model.eval()
    right = 0
    for k, item in enumerate(items):
        context = shots[(k * SHOTS) % len(shots):][:SHOTS]
        prompt = task.few_shot_text(context) + f"\n\nQuestion: {item['question']}\nAnswer:"
        ids = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0)
        text = tok.decode(out[0, ids.shape[1]:].tolist()).split("Question:")[0]
        got = text.split("####")[-1].strip().split("\n")[0].strip() if "####" in text else None
        right += got == item["answer"].split("####")[-1].strip()
    model.train()
    return right / len(items)


def sha256sums(root: Path) -> None:
    lines = [f"{hashlib.sha256((root / f).read_bytes()).hexdigest()}  {f}\n"
             for f in sorted(p.name for p in root.iterdir() if p.is_file() and p.name != "SHA256SUMS")]
    (root / "SHA256SUMS").write_text("".join(lines))


def train(out: Path, steps: int, batch: int, lr: float, seed: int, eval_items: int, progress: bool = True) -> dict:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = task.generate(seed, N_TRAIN, "train"), task.generate(seed + 1, N_TEST, "test")
    task.write_jsonl(train_rows, out / "train.jsonl")
    task.write_jsonl(test_rows, out / "test.jsonl")
    corpus = [task.few_shot_text(task.generate(seed + 3, 4000, "train"))]
    ids = write_tokenizer(out, PROFILE.vocab, texts=corpus, split_digits=True)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = DeepseekV3ForCausalLM(hf_config(ids["[BOS]"], ids["[EOS]"])).float().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    routers = [m.mlp.gate for m in model.model.layers if hasattr(m.mlp, "gate")]
    loads = {id(r): torch.zeros(PROFILE.experts) for r in routers}

    def count(router, _inputs, output):  # tokens per expert, for the loss-free balancing update
        loads[id(router)] += torch.bincount(output[2].flatten(), minlength=PROFILE.experts).float()

    hooks = [r.register_forward_hook(count) for r in routers]
    losses, started = [], time.perf_counter()
    stream = batches(tok, seed + 2, batch, ids["[PAD]"])
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress)
    for _ in bar:
        x, y = next(stream)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for r in routers:
                load = loads[id(r)]
                r.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
                load.zero_()
        losses.append(round(loss.item(), 5))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    for h in hooks:
        h.remove()
    seconds = time.perf_counter() - started
    acc = accuracy(model, tok, train_rows, test_rows[:eval_items]) if eval_items else None
    save_file(checkpoint_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    import transformers

    log = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "shots": SHOTS, "profile": vars(PROFILE),
           "seconds": round(seconds, 1), "threads": torch.get_num_threads(), "loss_every_step": losses,
           "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
           "fp32_greedy_accuracy": acc, "accuracy_items": eval_items,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    (out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    sha256sums(out)
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-items", type=int, default=200, help="test items for the fp32 accuracy in training.json")
    p.add_argument("--check", action="store_true", help="20 steps twice into temporary folders: same losses")
    args = p.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            a = train(Path(tmp) / "a", 20, 4, args.lr, args.seed, 0, progress=False)
            b = train(Path(tmp) / "b", 20, 4, args.lr, args.seed, 0, progress=False)
        same = a["loss_every_step"] == b["loss_every_step"]
        print(f"reproducible: {same}; losses {a['loss_every_step'][0]:.3f} -> {a['loss_every_step'][-1]:.3f}")
        return 0 if same else 1
    log = train(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_items)
    print(f"wrote {args.out}: {log['steps']} steps in {log['seconds']:.0f}s, loss {log['final_loss_mean_last_50']:.3f}, "
          f"fp32 greedy accuracy {log['fp32_greedy_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
