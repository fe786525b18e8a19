"""``requant smoke``: does a served checkpoint answer correctly enough to be worth evaluating?

Checks, each recorded with a one-line detail: health; the model list names the served model; greedy
completions are deterministic; ``max_tokens`` and ``stop`` are honoured (the stop string is cut from the
text, which lm-eval's GSM8K extraction depends on); concurrent requests all answer with the sequential
results; and, against a reference variant:

- **next-token agreement** at the end of each prompt (top-1 agreement, mean KL from the top-``k`` logprobs);
- **sequence agreement**: the reference writes a greedy continuation of each prompt (to the task's stop), both
  servers score that same text teacher-forced (``echo`` + ``logprobs``), and every position counts: top-1
  agreement over all positions, mean and worst per-prompt KL, and how many of the candidate's own greedy
  continuations equal the reference's. One position per prompt rarely routes through a few broken experts;
  a few hundred positions do;
- **expert coverage**, where a server reports routing (``requant serve`` does): how many of the scored tokens
  each routed expert of each MoE layer receives, so the agreement figures are known to have exercised every
  expert.

When the sequence agreement fails and both checkpoints are given, :mod:`requant.engines.localize` says where:
the first layer that departs from the reference and the experts with the largest output error. A failing
smoke test stops the evaluation downstream.

The KL estimate: for each position, the reference's top-k tokens plus one "rest" bucket form a partition;
the candidate's probability of a token outside its own top-k is unknown and is bounded by its k-th
probability, so it is imputed as min(k-th probability, unassigned mass / missing tokens). KL over a
coarser partition never exceeds the full KL, so this is an estimate of a lower bound on the true value.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import httpx
import yaml

from requant.engines.engines import RunningEngine
from requant.errors import RequantError
from requant.serving.protocol import EXPERT_COUNTS_PATH

# Fixed prompts in the evaluation's own format, so the numeric check looks at the distribution that matters.
PROMPTS = (
    ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?\nAnswer:"),
    ("Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
     "How much did she earn?\nAnswer:"),
    "Question: Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs.\nAnswer:",
    "Question: James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?\nAnswer:",
    "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?\nAnswer:",
    "Question: Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?\nAnswer: Tom has",
    "The capital of France is",
    "1, 2, 3, 4, 5,",
)


@dataclass(frozen=True)
class SmokeLimits:
    min_top1_agreement: float = 0.5
    max_mean_kl: float = 0.1
    continuation_tokens: int = 64
    stop: tuple[str, ...] = ("Question:", "\n\n")
    min_sequence_top1: float = 0.9
    confident_p: float = 0.5
    min_confident_positions: int = 32
    max_sequence_mean_kl: float = 0.1
    max_sequence_prompt_kl: float = 0.3
    min_exact_match: float = 0.0
    min_expert_tokens: int = 3
    localize_max_bytes: int = 16 << 30
    top_logprobs: int = 20
    concurrency: int = 4
    timeout_s: float = 300.0


def load_limits(path: str | Path | None = None) -> SmokeLimits:
    text = Path(path).read_text() if path else resources.files("requant.engines").joinpath("smoke.yaml").read_text()
    data = yaml.safe_load(text) or {}
    unknown = set(data) - set(SmokeLimits.__dataclass_fields__)
    if unknown:
        raise RequantError(f"{path or 'smoke.yaml'}: unknown smoke-test settings {sorted(unknown)}")
    if "stop" in data:
        data["stop"] = tuple(data["stop"])
    return SmokeLimits(**data)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


class _Client:
    def __init__(self, engine: RunningEngine, timeout: float):
        self.engine = engine
        self.http = httpx.Client(base_url=engine.base_url, headers=engine.headers(), timeout=timeout)

    def complete(self, prompt: str, **kw) -> dict:
        r = self.http.post("/v1/completions", json={"model": self.engine.served_model_name, "prompt": prompt, **kw})
        if r.status_code != 200:
            raise RequantError(f"{self.engine.base_url}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()


def task_prompts(gsm8k_dir: str | Path, n: int = 8) -> tuple[str, ...]:
    """Agreement prompts from the evaluation's own task: its first ``n`` test questions as lm-eval asks them
    (``Question: ...\nAnswer:``). A model trained on one task (the shipped trained model) is compared on what
    it was trained for: on other text its continuations are noise, and honest variants disagree there as much
    as broken ones (measured: per-prompt KL 0.15-0.69 on the two generic prompts for honest MXFP4, 0.001-0.002
    on its own questions). The real GSM8K gives the same kind of prompt as PROMPTS."""
    from requant.evaluation.gsm8k import check_gsm8k_dir

    test = check_gsm8k_dir(gsm8k_dir)["test"]
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    return tuple(f"Question: {row['question']}\nAnswer:" for row in rows)


def smoke_test(engine: RunningEngine, reference: RunningEngine | None = None,
               limits: SmokeLimits = SmokeLimits(), prompts: tuple[str, ...] | None = None,
               checkpoints: tuple[str, str] | None = None) -> dict:
    """Run every check; never raises for a failed check (the result says), only for unusable arguments.
    ``prompts``: the agreement checks' prompts (default: the built-in PROMPTS; see :func:`task_prompts`).
    ``checkpoints``: the (candidate, reference) checkpoints the two servers serve; when the sequence agreement
    fails, the result's ``numeric.localization`` says which layer and experts depart from the reference."""
    client = _Client(engine, limits.timeout_s)
    checks: list[Check] = []
    started = time.perf_counter()

    def run(name: str, fn) -> dict:
        """Run one check; returns what it measured ({} when it raised, which fails the check)."""
        measured: dict = {}
        try:
            passed, detail, *rest = fn()
            measured = rest[0] if rest else {}
        except (RequantError, httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append(Check(name, bool(passed), detail))
        return measured

    run("health", lambda: _health(client))
    run("model listed", lambda: _models(client))
    greedy = run("greedy deterministic", lambda: _deterministic(client))
    run("max_tokens honoured", lambda: _max_tokens(client))
    run("stop honoured", lambda: _stop(client, greedy.get("text", "")))
    run("concurrent requests", lambda: _concurrent(client, limits.concurrency))
    numeric = None
    if reference is not None:
        ref_client = _Client(reference, limits.timeout_s)
        numeric = run("agreement with reference", lambda: _agreement(client, ref_client, limits, prompts or PROMPTS))
        sequence = run("sequence agreement with reference",
                       lambda: _sequence_agreement(client, ref_client, limits, prompts or PROMPTS))
        numeric["sequence"] = sequence
        coverage = _coverage(ref_client, client, sequence.get("texts", ()), limits)
        numeric["coverage"] = coverage
        if coverage["available"]:
            checks.append(Check("expert coverage", coverage["experts_below"] == 0, coverage["detail"]))
        if checkpoints and not next(c for c in checks if c.name == "sequence agreement with reference").passed:
            numeric["localization"] = _localize(checkpoints, sequence.get("texts") or prompts or PROMPTS, limits)
    return {
        "passed": all(c.passed for c in checks),
        "base_url": engine.base_url, "model": engine.served_model_name, "engine": engine.engine,
        "reference": None if reference is None else {"base_url": reference.base_url, "model": reference.served_model_name},
        "checks": [asdict(c) for c in checks], "numeric": numeric, "limits": asdict(limits),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _health(client: _Client):
    r = client.http.get("/health")
    return r.status_code == 200, f"HTTP {r.status_code}"


def _models(client: _Client):
    ids = [m["id"] for m in client.http.get("/v1/models").json()["data"]]
    return client.engine.served_model_name in ids, f"served: {ids}"


def _deterministic(client: _Client):
    outs = [client.complete(PROMPTS[0], max_tokens=24, temperature=0)["choices"][0]["text"] for _ in range(2)]
    return (outs[0] == outs[1] and outs[0] != "", f"{len(outs[0])} chars, identical: {outs[0] == outs[1]}",
            {"text": outs[0]})


def _max_tokens(client: _Client):
    body = client.complete(PROMPTS[1], max_tokens=5, temperature=0, ignore_eos=True)
    used, finish = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
    return used <= 5 and (used == 5 or finish == "stop"), f"completion_tokens={used} finish_reason={finish}"


def _stop(client: _Client, text: str):
    """``text``: the greedy output of the determinism check, from which a stop string is picked."""
    if len(text) < 4:
        return False, f"greedy output too short to pick a stop string ({text!r})"
    start = len(text) // 2
    stop = text[start:start + 2]
    expected = text[:text.find(stop)]
    body = client.complete(PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    got, finish = body["choices"][0]["text"], body["choices"][0]["finish_reason"]
    ok = got == expected and finish == "stop" and stop not in got
    return ok, f"stop={stop!r}: expected {len(expected)} chars, got {len(got)}, finish_reason={finish}"


def _concurrent(client: _Client, n: int):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    sequential = [client.complete(p, max_tokens=8, temperature=0)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(n) as pool:
        parallel = list(pool.map(lambda p: client.complete(p, max_tokens=8, temperature=0)["choices"][0]["text"], prompts))
    same = sum(a == b for a, b in zip(sequential, parallel))
    return same == n, f"{n} concurrent requests, {same} match the sequential answers"


def _top(client: _Client, prompt: str, k: int, **extra) -> dict[str, float]:
    body = client.complete(prompt, max_tokens=1, temperature=0, logprobs=k, **extra)
    return body["choices"][0]["logprobs"]["top_logprobs"][0]


def _by_id(top: dict[str, float]) -> bool:
    return all(token.startswith("token_id:") for token in top)


def _tops(client: _Client, ref_client: _Client, prompt: str, k: int) -> tuple[dict[str, float], dict[str, float], str]:
    """Both servers' next-token top-k, keyed by token id where both support vLLM's ``return_tokens_as_token_ids``
    (keys by decoded text merge byte pieces of one character, and servers render those pieces differently);
    else by decoded text, OpenAI's format."""
    cand, ref = (_top(c, prompt, k, return_tokens_as_token_ids=True) for c in (client, ref_client))
    if _by_id(cand) and _by_id(ref):
        return cand, ref, "token ids"
    return _top(client, prompt, k), _top(ref_client, prompt, k), "decoded text"


def next_token_kl(ref: dict[str, float], cand: dict[str, float]) -> float:
    """KL(reference || candidate) over the reference's top-k tokens plus a 'rest' bucket (see module doc)."""
    cand_p = {t: math.exp(v) for t, v in cand.items()}
    floor = min(cand_p.values())
    missing = [t for t in ref if t not in cand_p]
    spare = max(1.0 - sum(cand_p.values()), 0.0)
    impute = min(floor, spare / len(missing)) if missing else 0.0
    kl, ref_mass, cand_mass = 0.0, 0.0, 0.0
    for token, lp in ref.items():
        p = math.exp(lp)
        q = max(cand_p.get(token, impute), 1e-12)
        kl += p * (lp - math.log(q))
        ref_mass, cand_mass = ref_mass + p, cand_mass + q
    p_rest, q_rest = max(1.0 - ref_mass, 0.0), max(1.0 - cand_mass, 1e-12)
    if p_rest > 0:
        kl += p_rest * (math.log(p_rest) - math.log(q_rest))
    return max(kl, 0.0)


def _agreement(client: _Client, ref_client: _Client, limits: SmokeLimits, prompts: tuple[str, ...]):
    agree, kls, keys = 0, [], set()
    for prompt in prompts:
        cand, ref, key = _tops(client, ref_client, prompt, limits.top_logprobs)
        keys.add(key)
        agree += max(cand, key=cand.get) == max(ref, key=ref.get)
        kls.append(next_token_kl(ref, cand))
    top1, mean_kl = agree / len(prompts), sum(kls) / len(kls)
    measured = {"prompts": len(prompts), "prompt_source": "built-in" if prompts == PROMPTS else "task",
                "top1_agreement": top1, "mean_kl": mean_kl, "kl_per_prompt": kls,
                "top_logprobs": limits.top_logprobs, "keys": sorted(keys)}
    ok = top1 >= limits.min_top1_agreement and mean_kl <= limits.max_mean_kl
    return ok, (f"top-1 agreement {top1:.2f} (min {limits.min_top1_agreement}), mean KL {mean_kl:.4f} nats "
                f"(max {limits.max_mean_kl}) over {len(prompts)} prompts"), measured


def _scored(client: _Client, text: str, k: int, by_id: bool) -> tuple[list[str], list[dict[str, float]]]:
    """The text's tokens and, for every position after the first, the top-k next-token logprobs given the text
    before it (teacher-forced through ``echo``); the last entry is the distribution after the whole text."""
    extra = {"return_tokens_as_token_ids": True} if by_id else {}
    body = client.complete(text, max_tokens=1, temperature=0, echo=True, logprobs=k, **extra)
    lp = body["choices"][0]["logprobs"]
    tokens, tops = lp["tokens"], lp["top_logprobs"]
    return tokens[:-1], [t for t in tops if t]


def _sequence_agreement(client: _Client, ref_client: _Client, limits: SmokeLimits, prompts: tuple[str, ...]):
    k, stop = limits.top_logprobs, list(limits.stop)
    greedy = {"max_tokens": limits.continuation_tokens, "temperature": 0, "stop": stop}
    texts, per_prompt, agree, confident, positions, exact, keys = [], [], 0, 0, 0, 0, set()
    for prompt in prompts:
        ref_text = ref_client.complete(prompt, **greedy)["choices"][0]["text"]
        exact += client.complete(prompt, **greedy)["choices"][0]["text"] == ref_text
        text = prompt + ref_text
        texts.append(text)
        (ref_tokens, ref_tops), (cand_tokens, cand_tops) = (_scored(c, text, k, True) for c in (ref_client, client))
        key = "token ids"
        if not (all(_by_id(t) for t in ref_tops) and all(_by_id(t) for t in cand_tops)):
            (ref_tokens, ref_tops), (cand_tokens, cand_tops) = (_scored(c, text, k, False) for c in (ref_client, client))
            key = "decoded text"
        keys.add(key)
        if ref_tokens != cand_tokens or len(ref_tops) != len(cand_tops):
            raise RequantError(f"the two servers tokenize the smoke text differently ({len(ref_tokens)} vs "
                               f"{len(cand_tokens)} tokens): not the same tokenizer, so they cannot be compared")
        kls = [next_token_kl(r, c) for r, c in zip(ref_tops, cand_tops)]
        agreed = [max(c, key=c.get) == max(r, key=r.get) for r, c in zip(ref_tops, cand_tops)]
        sure = [a for a, r in zip(agreed, ref_tops) if max(r.values()) >= math.log(limits.confident_p)]
        agree, confident, positions = agree + sum(sure), confident + len(sure), positions + len(kls)
        per_prompt.append({"positions": len(kls), "continuation_chars": len(ref_text), "top1": sum(agreed) / len(kls),
                           "confident_positions": len(sure), "mean_kl": sum(kls) / len(kls), "max_kl": max(kls)})
    top1 = agree / confident if confident else None
    mean_kl = sum(p["mean_kl"] for p in per_prompt) / len(per_prompt)
    worst = max(p["mean_kl"] for p in per_prompt)
    rate = exact / len(prompts)
    measured = {"prompts": len(prompts), "positions": positions, "confident_positions": confident,
                "top1_agreement": top1,
                "top1_all_positions": sum(p["top1"] * p["positions"] for p in per_prompt) / positions,
                "mean_kl": mean_kl, "max_prompt_kl": worst, "exact_match": rate, "per_prompt": per_prompt,
                "keys": sorted(keys), "texts": texts}
    top1_ok = top1 is None or confident < limits.min_confident_positions or top1 >= limits.min_sequence_top1
    ok = (top1_ok and mean_kl <= limits.max_sequence_mean_kl and worst <= limits.max_sequence_prompt_kl
          and rate >= limits.min_exact_match)
    top1_text = (f"top-1 {top1:.3f} at {confident} confident positions (min {limits.min_sequence_top1})"
                 if confident >= limits.min_confident_positions else
                 f"top-1 not judged ({confident} positions where the reference is confident, fewer than "
                 f"{limits.min_confident_positions})")
    return ok, (f"over {positions} positions of {len(prompts)} reference continuations: {top1_text}, mean KL "
                f"{mean_kl:.4f} (max {limits.max_sequence_mean_kl}), worst prompt KL {worst:.4f} (max "
                f"{limits.max_sequence_prompt_kl}), greedy continuations equal {exact}/{len(prompts)} "
                f"(min {limits.min_exact_match})"), measured


def _coverage(ref_client: _Client, client: _Client, texts, limits: SmokeLimits) -> dict:
    """Routed-token counts per expert on the scored texts, from the first server that reports them."""
    if not texts:
        return {"available": False, "reason": "no scored texts"}
    report, statuses = None, []
    for who, c in (("reference", ref_client), ("candidate", client)):
        r = c.http.post(EXPERT_COUNTS_PATH, json={"model": c.engine.served_model_name, "prompt": list(texts)})
        statuses.append(r.status_code)
        if r.status_code == 200:
            report = who, r.json()
            break
    if report is None:
        return {"available": False, "reason": f"neither server reports expert routing ({EXPERT_COUNTS_PATH}: "
                                              f"HTTP {statuses}); requant serve does"}
    who, body = report
    layers = {int(k): v for k, v in body["layers"].items()}
    if not layers:
        return {"available": False, "reason": f"the {who} has no MoE layer"}
    lows = {layer: min(row) for layer, row in layers.items()}
    below = {layer: [e for e, n in enumerate(row) if n < limits.min_expert_tokens] for layer, row in layers.items()}
    n_below = sum(map(len, below.values()))
    experts = len(next(iter(layers.values())))
    detail = (f"{body['tokens']} tokens reach every routed expert of {len(layers)} MoE layers x {experts} at least "
              f"{min(lows.values())} times (min {limits.min_expert_tokens}; counted by the {who})" if not n_below else
              f"{n_below} of {len(layers) * experts} routed experts got fewer than {limits.min_expert_tokens} of "
              f"{body['tokens']} tokens, e.g. layer {next(k for k, v in below.items() if v)} experts "
              f"{next(v for v in below.values() if v)[:8]}: the agreement cannot vouch for them; add prompts")
    return {"available": True, "source": who, "tokens": body["tokens"], "top_k": body.get("top_k"),
            "moe_layers": len(layers), "experts": experts, "min_tokens": min(lows.values()),
            "min_tokens_per_layer": {str(k): v for k, v in lows.items()}, "experts_below": n_below,
            "counts": {str(k): v for k, v in layers.items()}, "detail": detail}


def _localize(checkpoints: tuple[str, str], texts, limits: SmokeLimits) -> dict:
    from requant.engines.localize import LocalizeLimits, localize

    try:
        return localize(checkpoints[0], checkpoints[1], list(texts), LocalizeLimits(max_bytes=limits.localize_max_bytes))
    except Exception as exc:                      # localization explains a failure; it must not replace it
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}


def format_result(result: dict) -> str:
    from requant.engines.localize import format_localization

    lines = [f"smoke test {'PASSED' if result['passed'] else 'FAILED'}: {result['model']} at {result['base_url']}"]
    lines += [f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}" for c in result["checks"]]
    numeric = result.get("numeric") or {}
    coverage = numeric.get("coverage")
    if coverage and not coverage["available"]:
        lines.append(f"  expert coverage: unknown ({coverage['reason']})")
    if numeric.get("localization"):
        lines.append("  " + format_localization(numeric["localization"]).replace("\n", "\n  "))
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
