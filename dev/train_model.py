"""make train-model: train the small Kimi-K2.6-shaped model on the arithmetic task and write its assets.

Everything is seeded and runs on CPU in minutes: the data splits (requant.testing.trained.task), a tokenizer with
single-digit tokens, transformers' DeepseekV3ForCausalLM built from exactly the text config `requant synth
--profile trained` writes (MLA 512/64/128/128, sigmoid noaux_tc router, 1 shared + 8 routed experts, layer 0
dense), AdamW on freshly generated training problems laid out as lm-eval's few-shot prompts, and DeepSeek's
auxiliary-loss-free balancing (the router's e_score_correction_bias nudged towards equal expert load). The
result goes to requant/testing/trained/assets/: model.safetensors (BF16, checkpoint names), tokenizer files,
train.jsonl / test.jsonl (GSM8K schema), training.json (settings, loss curve, accuracy, seconds) and
SHA256SUMS. Tests and `make flow-run` use these files; they never train.

    python -m dev.train_model [--steps 1500] [--out DIR]
    python -m dev.train_model --check   # a short seeded run that must reproduce its own loss curve
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from requant.io.checksums import write_sums
from requant.testing.synth import PROFILES, int4_fake_quantize, text_config
from requant.testing.trained import ASSETS, task
from requant.tokenizer import write_tokenizer

PROFILE = PROFILES["trained"]
N_TRAIN, N_TEST = 7473, 1319  # GSM8K's split sizes
SHOTS = 3                      # the evaluation's few-shot count; training sequences hold SHOTS + 1 problems
QUESTION_WEIGHT = 0.1          # loss weight of question and layout tokens (answers weigh 1)


def hf_config(bos: int, eos: int):
    from transformers import DeepseekV3Config

    text = text_config(PROFILE, bos, eos)
    config = DeepseekV3Config(**{k: v for k, v in text.items()
                                 if k not in ("quantization_config", "architectures", "model_type")})
    config._attn_implementation = "eager"
    config._experts_implementation = "grouped_mm"  # same numbers as "eager", faster on CPU
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


def encode(tok: Tokenizer, examples: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of ``examples`` laid out as lm-eval's few-shot prompt, and for each token the index of the
    example whose answer it belongs to (-1 for question and layout tokens)."""
    text = task.few_shot_text(examples)
    spans, at = [], 0
    for e in examples:
        start = text.index("\nAnswer: ", at) + len("\nAnswer:")
        at = start + len(e["answer"]) + 1
        spans.append((start, at))
    enc = tok.encode(text)
    owner = [next((k for k, (a, b) in enumerate(spans) if a <= lo < b), -1) for lo, _ in enc.offsets]
    return enc.ids, owner


def pack(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    owner = torch.full((len(rows), width), -2)  # -2: padding
    for i, (s, o) in enumerate(rows):
        ids[i, :len(s)] = torch.tensor(s)
        owner[i, :len(o)] = torch.tensor(o)
    return ids, owner


def load_checkpoint_tensors(model, path: Path) -> None:
    """Start from trained weights (``checkpoint_tensors``'s names, e.g. the shipped assets): per-expert matrices
    go back into transformers' fused expert tensors."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix(".gate_up_proj")
            state[name] = torch.stack([torch.cat([saved[f"{base}.{e}.gate_proj.weight"], saved[f"{base}.{e}.up_proj.weight"]])
                                       for e in range(tensor.shape[0])])
        elif name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix(".down_proj")
            state[name] = torch.stack([saved[f"{base}.{e}.down_proj.weight"] for e in range(tensor.shape[0])])
        elif name in saved:
            state[name] = saved[name]
    missing = set(model.state_dict()) - set(state) - {n for n in model.state_dict() if "inv_freq" in n}
    if missing:
        raise SystemExit(f"{path}: no {sorted(missing)[0]} (and {len(missing) - 1} more)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def batches(tok: Tokenizer, seed: int, batch: int, pad: int):
    """Endless batches of SHOTS + 1 fresh training problems per sequence, laid out as lm-eval lays out a prompt."""
    problems = task.stream(seed, "train")
    while True:
        yield pack([encode(tok, [next(problems) for _ in range(SHOTS + 1)]) for _ in range(batch)], pad)


def weighted_loss(logits: torch.Tensor, ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; answer tokens (what the evaluation scores) weigh 1, the questions and the
    layout QUESTION_WEIGHT (their numbers are random: mostly noise to learn), padding 0."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    target_owner = owner[:, 1:].flatten()
    w = torch.where(target_owner >= 0, 1.0, QUESTION_WEIGHT) * (target_owner > -2)
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def answer_exact_match(model, rows: list[tuple[list[int], list[int]]], pad: int) -> float:
    """Share of sequences whose last answer is predicted right token by token under teacher forcing: one
    forward pass, and a lower bound on greedy accuracy (every token right means greedy decoding reproduces
    the answer; but greedy may also reach the right text through another tokenization, or the right number
    through other wording). The final run: 0.53 here against 0.985 greedy."""
    model.eval()
    ids, owner = pack(rows, pad)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
    last = owner[:, 1:] == SHOTS
    right = ((pred == ids[:, 1:]) | ~last).all(dim=1)
    model.train()
    return right.float().mean().item()


class FakeInt4(torch.nn.Module):
    """Quantization-aware training of the routed experts, as Moonshot trains K2.6 for its INT4 release: the
    forward pass sees exactly what ``requant synth`` will store for the BF16 master weight, the gradient
    passes straight through."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return int4_fake_quantize(w)


def expert_modules(model):
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


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


def train(out: Path, steps: int, batch: int, lr: float, seed: int, eval_items: int, qat_from: float = 0.7,
          eval_every: int = 250, progress: bool = True, init_from: Path | None = None) -> dict:
    from torch.nn.utils import parametrize
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    random.seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "SHA256SUMS").unlink(missing_ok=True)  # the folder only looks complete once the run finishes
    train_rows, test_rows = task.generate(seed, N_TRAIN, "train"), task.generate(seed + 1, N_TEST, "test")
    task.write_jsonl(train_rows, out / "train.jsonl")
    task.write_jsonl(test_rows, out / "test.jsonl")
    corpus = [task.few_shot_text(task.generate(seed + 3, 4000, "train"))]
    if init_from is not None:  # keep the tokenizer the weights were trained with
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (init_from / name).resolve() != (out / name).resolve():
                shutil.copyfile(init_from / name, out / name)
        ids = {tok: Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(tok) for tok in ("[BOS]", "[EOS]", "[PAD]")}
    else:
        ids = write_tokenizer(out, PROFILE.vocab, texts=corpus, split_digits=True)
    pad = ids["[PAD]"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    # held-out probe: 3 training shots + a test problem, as the evaluation prompts
    probe = [encode(tok, train_rows[(k * SHOTS) % len(train_rows):][:SHOTS] + [item])
             for k, item in enumerate(test_rows[:128])]
    model = DeepseekV3ForCausalLM(hf_config(ids["[BOS]"], ids["[EOS]"])).float().train()
    if init_from is not None:
        load_checkpoint_tensors(model, init_from / "model.safetensors")
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
    losses, curve, started = [], [], time.perf_counter()
    stream = batches(tok, seed + 2, batch, pad)
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress)
    for step in bar:
        if step == int(qat_from * steps):
            for experts in expert_modules(model):
                for name in ("gate_up_proj", "down_proj"):
                    parametrize.register_parametrization(experts, name, FakeInt4())
        x, owner = next(stream)
        loss = weighted_loss(model(input_ids=x).logits, x, owner)
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
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            for load in loads.values():
                load.zero_()
            curve.append({"step": step + 1, "exact_match": answer_exact_match(model, probe, pad)})
            for load in loads.values():
                load.zero_()
            print(f"step {step + 1}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, held-out answer exact "
                  f"match {curve[-1]['exact_match']:.3f}", file=sys.stderr, flush=True)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    for h in hooks:
        h.remove()
    for experts in expert_modules(model):  # keep the master weights; synth quantizes them as QAT did
        for name in ("gate_up_proj", "down_proj"):
            if parametrize.is_parametrized(experts, name):
                parametrize.remove_parametrizations(experts, name, leave_parametrized=False)
    seconds = time.perf_counter() - started
    acc = accuracy(model, tok, train_rows, test_rows[:eval_items]) if eval_items else None
    save_file(checkpoint_tensors(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    import transformers

    log = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "shots": SHOTS, "qat_from_step": int(qat_from * steps),
           "question_weight": QUESTION_WEIGHT, "profile": vars(PROFILE),
           "seconds": round(seconds, 1), "threads": torch.get_num_threads(), "loss_every_step": losses,
           "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
           "held_out_answer_exact_match": curve,
           "fp32_greedy_accuracy": acc, "accuracy_items": eval_items,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    if init_from is not None:  # the history of the weights this run started from
        before = json.loads((init_from / "training.json").read_text())
        log["continued_from"] = {k: before[k] for k in ("steps", "batch", "lr", "seconds", "qat_from_step",
                                                         "held_out_answer_exact_match", "fp32_greedy_accuracy",
                                                         "continued_from") if k in before}
    (out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    write_sums(out)
    return log


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qat-from", type=float, default=0.7, help="fraction of the steps after which the routed "
                   "experts train through INT4 fake quantization")
    p.add_argument("--init-from", type=Path, help="continue from the weights and tokenizer in this folder (e.g. the "
                   "shipped assets) instead of a fresh initialisation")
    p.add_argument("--eval-items", type=int, default=200, help="test items for the fp32 accuracy in training.json")
    p.add_argument("--check", action="store_true", help="20 steps twice into temporary folders: same losses")
    args = p.parse_args(argv)
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            a = train(Path(tmp) / "a", 20, 4, args.lr, args.seed, 0, qat_from=0.5, eval_every=0, progress=False)
            b = train(Path(tmp) / "b", 20, 4, args.lr, args.seed, 0, qat_from=0.5, eval_every=0, progress=False)
        same = a["loss_every_step"] == b["loss_every_step"]
        print(f"reproducible: {same}; losses {a['loss_every_step'][0]:.3f} -> {a['loss_every_step'][-1]:.3f}")
        return 0 if same else 1
    log = train(args.out, args.steps, args.batch, args.lr, args.seed, args.eval_items, qat_from=args.qat_from,
                init_from=args.init_from)
    print(f"wrote {args.out}: {log['steps']} steps in {log['seconds']:.0f}s, loss {log['final_loss_mean_last_50']:.3f}, "
          f"fp32 greedy accuracy {log['fp32_greedy_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
