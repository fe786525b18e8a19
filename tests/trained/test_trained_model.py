"""The trained-model pipeline's parts that do not need a trained model: the task and the training run.

`make train-model` (dev/train_model.py) trains; tests never do beyond a short reproducibility check. The
task generator must give GSM8K-schema rows that lm-eval's gsm8k task accepts, with disjoint splits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from requant.evaluation.gsm8k import check_gsm8k_dir
from requant.testing.trained import task

ROOT = Path(__file__).resolve().parents[2]


def test_training_is_reproducible():
    out = subprocess.run([sys.executable, "-m", "dev.train_model", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0 and "reproducible: True" in out.stdout, out.stdout + out.stderr[-2000:]


def test_the_task_is_gsm8k_shaped_seeded_and_its_splits_are_disjoint(tmp_path):
    train, test = task.generate(0, 3000, "train"), task.generate(1, 1000, "test")
    assert train == task.generate(0, 3000, "train")                          # seeded
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(task.is_test(r["question"]) for r in test) and not any(task.is_test(r["question"]) for r in train)
    assert len({r["question"] for r in test}) == 1000
    for row in train[:500] + test[:500]:
        *steps, final = row["answer"].split("\n")
        answer = int(final.removeprefix("#### "))
        for step in steps:                                                   # every shown step is right
            a, op, b, c = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", step).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), step
        assert answer == int(re.findall(r"= (\d+)", steps[-1])[-1]) and answer >= 0
    task.write_jsonl(train, tmp_path / "train.jsonl")
    task.write_jsonl(test, tmp_path / "test.jsonl")
    files = check_gsm8k_dir(tmp_path)                                        # the evaluation's loader takes it
    assert json.loads(files["test"].read_text().splitlines()[0]) == test[0]
