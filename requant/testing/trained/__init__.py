"""A small model actually trained, in Kimi-K2.6's shape, so the downstream gate has a signal to judge.

``task`` generates GSM8K-format arithmetic word problems (seeded; train/test disjoint by construction);
``assets/`` holds what ``make train-model`` produced: the weights, the tokenizer, the data splits, their
SHA256SUMS and the training log. ``requant synth --profile trained`` builds a Kimi-K2.6-layout INT4 upstream
from them; nothing is trained at test time.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_FILES = ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "train.jsonl", "test.jsonl",
               "training.json")
