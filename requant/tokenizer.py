"""A small byte-level BPE tokenizer trained locally, so synthetic checkpoints can be served offline.

The training text is generated (grade-school arithmetic word problems in GSM8K's "Question/Answer/####"
shape), so nothing is downloaded and the result depends only on the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["[BOS]", "[EOS]", "[PAD]", "[UNK]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                  "<|im_system|>", "<|im_middle|>", "<|media_pad|>"]

_NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Mark", "Tina", "Ken", "Alexis", "Janet", "Tom"]
_ITEMS = ["clips", "apples", "books", "dollars", "pages", "cookies", "eggs", "marbles", "tickets", "minutes"]
_VERBS = ["sold", "bought", "read", "baked", "found", "gave away", "collected", "earned", "used", "spent"]


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        name, item, verb = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_VERBS)
        a, b = rng.randint(1, 99), rng.randint(1, 12)
        text.append(
            f"Question: {name} {verb} {a} {item} in April, and then {b} times as many in May. "
            f"How many {item} did {name} {verb} altogether?\nAnswer: In May {name} {verb} {a}*{b} = <<{a}*{b}={a * b}>>{a * b} {item}. "
            f"Altogether {a}+{a * b} = <<{a}+{a * b}={a + a * b}>>{a + a * b}.\n#### {a + a * b}\n"
        )
    return text


def write_tokenizer(dst: Path, vocab_size: int, seed: int = 0, texts: list[str] | None = None,
                    split_digits: bool = False) -> dict[str, int]:
    """Train and write tokenizer.json + tokenizer_config.json; returns the special tokens' ids.

    ``texts``: the training text (default: the generated word-problem corpus for ``seed``). ``split_digits``
    makes every digit its own token, which is what lets a small model learn arithmetic.
    """
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else corpus(seed), trainer=trainer)
    tok.save(str(dst / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "model_max_length": 262144,
        "add_bos_token": False,
        "chat_template": (
            "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
        ),
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
