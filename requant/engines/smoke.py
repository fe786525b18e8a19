"""``requant smoke``: does a served checkpoint answer correctly enough to be worth evaluating?

Checks, each recorded with a one-line detail: health; the model list names the served model; greedy
completions are deterministic; ``max_tokens`` and ``stop`` are honoured (the stop string is cut from the
text, which lm-eval's GSM8K extraction depends on); concurrent requests all answer with the sequential
results; and, against a reference variant, next-token agreement on fixed prompts: top-1 agreement and a
mean KL divergence estimated from the top-``k`` logprobs both servers return. A failing smoke test stops
the evaluation downstream.

The KL estimate: for each prompt, the reference's top-k tokens plus one "rest" bucket form a partition;
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
    top_logprobs: int = 20
    concurrency: int = 4
    timeout_s: float = 300.0


def load_limits(path: str | Path | None = None) -> SmokeLimits:
    text = Path(path).read_text() if path else resources.files("requant.engines").joinpath("smoke.yaml").read_text()
    data = yaml.safe_load(text) or {}
    unknown = set(data) - set(SmokeLimits.__dataclass_fields__)
    if unknown:
        raise RequantError(f"{path or 'smoke.yaml'}: unknown smoke-test settings {sorted(unknown)}")
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


def task_prompts(gsm8k_dir: str | Path, n: int = 6) -> tuple[str, ...]:
    """Agreement prompts from the evaluation's own task: its first ``n`` test questions as lm-eval asks them
    (``Question: ...\nAnswer:``), plus the two generic prompts. A model trained on one task (the shipped
    trained model) is compared on what it was trained for; the real GSM8K gives the same kind as PROMPTS."""
    from requant.evaluation.gsm8k import check_gsm8k_dir

    test = check_gsm8k_dir(gsm8k_dir)["test"]
    rows = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    return tuple(f"Question: {row['question']}\nAnswer:" for row in rows) + PROMPTS[-2:]


def smoke_test(engine: RunningEngine, reference: RunningEngine | None = None,
               limits: SmokeLimits = SmokeLimits(), prompts: tuple[str, ...] | None = None) -> dict:
    """Run every check; never raises for a failed check (the result says), only for unusable arguments.
    ``prompts``: the agreement check's prompts (default: the built-in PROMPTS; see :func:`task_prompts`)."""
    client = _Client(engine, limits.timeout_s)
    checks: list[Check] = []
    started = time.perf_counter()

    def run(name: str, fn) -> None:
        try:
            passed, detail = fn()
        except (RequantError, httpx.HTTPError, KeyError, IndexError, ValueError, TypeError) as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        checks.append(Check(name, bool(passed), detail))

    run("health", lambda: _health(client))
    run("model listed", lambda: _models(client))
    greedy = {}
    run("greedy deterministic", lambda: _deterministic(client, greedy))
    run("max_tokens honoured", lambda: _max_tokens(client))
    run("stop honoured", lambda: _stop(client, greedy))
    run("concurrent requests", lambda: _concurrent(client, limits.concurrency))
    numeric = None
    if reference is not None:
        numeric = {}
        run("agreement with reference", lambda: _agreement(client, _Client(reference, limits.timeout_s), limits, numeric,
                                                           prompts or PROMPTS))
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


def _deterministic(client: _Client, greedy: dict):
    outs = [client.complete(PROMPTS[0], max_tokens=24, temperature=0)["choices"][0]["text"] for _ in range(2)]
    greedy["text"] = outs[0]
    return outs[0] == outs[1] and outs[0] != "", f"{len(outs[0])} chars, identical: {outs[0] == outs[1]}"


def _max_tokens(client: _Client):
    body = client.complete(PROMPTS[1], max_tokens=5, temperature=0, ignore_eos=True)
    used, finish = body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]
    return used <= 5 and (used == 5 or finish == "stop"), f"completion_tokens={used} finish_reason={finish}"


def _stop(client: _Client, greedy: dict):
    text = greedy.get("text", "")
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


def _agreement(client: _Client, ref_client: _Client, limits: SmokeLimits, numeric: dict, prompts: tuple[str, ...]):
    agree, kls, keys = 0, [], set()
    for prompt in prompts:
        cand, ref, key = _tops(client, ref_client, prompt, limits.top_logprobs)
        keys.add(key)
        agree += max(cand, key=cand.get) == max(ref, key=ref.get)
        kls.append(next_token_kl(ref, cand))
    top1, mean_kl = agree / len(prompts), sum(kls) / len(kls)
    numeric.update({"prompts": len(prompts), "prompt_source": "built-in" if prompts == PROMPTS else "task",
                    "top1_agreement": top1, "mean_kl": mean_kl, "kl_per_prompt": kls,
                    "top_logprobs": limits.top_logprobs, "keys": sorted(keys)})
    ok = top1 >= limits.min_top1_agreement and mean_kl <= limits.max_mean_kl
    return ok, (f"top-1 agreement {top1:.2f} (min {limits.min_top1_agreement}), mean KL {mean_kl:.4f} nats "
                f"(max {limits.max_mean_kl}) over {len(prompts)} prompts")


def format_result(result: dict) -> str:
    lines = [f"smoke test {'PASSED' if result['passed'] else 'FAILED'}: {result['model']} at {result['base_url']}"]
    lines += [f"  [{'ok' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}" for c in result["checks"]]
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
