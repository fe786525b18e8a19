"""Two-step arithmetic word problems in GSM8K's schema ({"question", "answer"}, answers ending in ``#### N``).

The answer spells out each step the way GSM8K's do (``a + b = c``), so lm-eval's ``gsm8k`` task and its
``strict-match`` / ``flexible-extract`` filters apply unchanged. A problem belongs to the test split when the
SHA-256 of its question falls in a fixed range, so train and test are disjoint whatever the seed or size, and
a training stream can skip test questions without holding the test set.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Tina", "Ken", "Alexis", "Janet", "Tom",
         "Maria", "Omar", "Priya", "Lena", "Sam", "Ivy"]
ITEMS = ["apples", "books", "cookies", "eggs", "marbles", "tickets", "stickers", "pencils", "shells", "cards"]
TEST_FRACTION = 1 / 8


def is_test(question: str) -> bool:
    """Deterministic split: the first byte of the question's SHA-256, below 256/8, means test."""
    return hashlib.sha256(question.encode()).digest()[0] < 256 * TEST_FRACTION


def _problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:  # a + b - c
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item}. {name} gets {b} more {item} and then gives away {c}. "
             f"How many {item} does {name} have now?")
        steps = [f"{name} has {a} + {b} = {a + b} {item}.", f"After giving away {c}, {a + b} - {c} = {a + b - c}."]
        r = a + b - c
    elif kind == 1:  # t - (a + b)
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        t = rng.randint(a + b + 1, a + b + 60)
        q = (f"{name} needs {t} {item}. {name} collects {a} on Monday and {b} on Tuesday. "
             f"How many more {item} does {name} need?")
        steps = [f"{name} collects {a} + {b} = {a + b} {item}.", f"{name} still needs {t} - {a + b} = {t - a - b}."]
        r = t - a - b
    elif kind == 2:  # a * b - c
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b - 1)
        q = (f"{name} buys {a} bags with {b} {item} in each bag. {name} uses {c} {item}. "
             f"How many {item} are left?")
        steps = [f"{name} buys {a} * {b} = {a * b} {item}.", f"{a * b} - {c} = {a * b - c} are left."]
        r = a * b - c
    else:  # a * b + c
        a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 50)
        q = (f"{name} earns {b} dollars a day for {a} days and is given {c} dollars more. "
             f"How many dollars does {name} have?")
        steps = [f"{name} earns {a} * {b} = {a * b} dollars.", f"{a * b} + {c} = {a * b + c} dollars in all."]
        r = a * b + c
    return {"question": q, "answer": "\n".join(steps) + f"\n#### {r}"}


def stream(seed: int, split: str) -> Iterator[dict[str, str]]:
    """Endless problems of one split ("train" or "test"), in a seeded order (repeats possible)."""
    rng = random.Random(seed)
    want_test = split == "test"
    while True:
        p = _problem(rng)
        if is_test(p["question"]) == want_test:
            yield p


def generate(seed: int, n: int, split: str) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split``."""
    seen: set[str] = set()
    out = []
    for p in stream(seed, split):
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def few_shot_text(examples: list[dict[str, str]]) -> str:
    """Examples the way lm-eval's gsm8k task lays out a few-shot prompt: ``Question: q\\nAnswer: a`` joined
    by blank lines."""
    return "\n\n".join(f"Question: {e['question']}\nAnswer: {e['answer']}" for e in examples)
