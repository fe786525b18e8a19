"""requant.settings: every REQUANT_* variable declared once, parsed when read, a malformed value a one-line error;
every name the code, scripts and docs mention is declared, and no product module reads one from os.environ itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from requant import settings
from requant.errors import RequantError
from requant.settings import SettingError

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bREQUANT_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")  # not the bare prefix "REQUANT_" (the flow forwards those)

# Where REQUANT_* names may be mentioned (code, scripts, manifests, docs); tests/ only count where they read one.
MENTIONS = ("requant", "flows", "tasks", "dev", "infra", "docs")
MENTION_FILES = ("Makefile", "prefect.yaml", "README.md")
PRODUCT = ("requant", "flows", "tasks", "dev", "infra")
ATTRIBUTE = {v.name: k for k, v in vars(settings).items() if isinstance(v, settings.Setting)}
# Reads that stay outside settings.py, and why.
EXEMPT = {
    "requant/settings.py": "the one reader",
    # copied into vLLM's interpreter, where only the standard library and vLLM exist (see its docstring)
    "requant/engines/vllm_probe.py": "runs in vLLM's interpreter",
}
# Reads in files another change is rewriting (requant/pipeline.py becomes requant/run/, ray_settings moves from
# flows/requantize.py to flows/runtime.py), by variable: the files that may still read it directly, where
# settings.RAY_CPUS.get() and settings.SCRATCH.get() replace the reads. Remove a variable once no file reads it
# directly any more (the test below says when).
PENDING: dict[str, set[str]] = {}

@pytest.fixture
def clean_env(monkeypatch):
    for setting in settings.ALL:
        monkeypatch.delenv(setting.name, raising=False)
    return monkeypatch


def test_the_registry_is_complete_and_each_entry_documented():
    names = [s.name for s in settings.ALL]
    assert len(names) == len(set(names)) and set(names) == set(settings.BY_NAME)
    module_level = {v.name for v in vars(settings).values() if isinstance(v, settings.Setting)}
    assert module_level == set(names), "a Setting declared in settings.py is missing from settings.ALL"
    for s in settings.ALL:
        assert NAME.fullmatch(s.name), s.name
        assert s.description and s.expected and s.readers and s.default_label()
        assert s.scope in (settings.USER, settings.INTERNAL, settings.TEST)


def test_defaults_when_unset_or_empty(clean_env):
    assert settings.LEASE_TTL_SECONDS.get() == 120.0
    assert settings.S3_RETRY_SECONDS.get() == 120.0
    assert settings.HF_RETRIES.get() == 5
    assert settings.VERBOSE.get() is False
    assert settings.FAULT_SEED.get() == 7
    for s in (settings.API_KEY, settings.GSM8K_DIR, settings.LOG_DIR, settings.SCRATCH, settings.RAY_CPUS,
              settings.HOME, settings.SGLANG_PYTHON, settings.HARDENING):
        assert s.get() is None, s.name
    clean_env.setenv("REQUANT_HF_RETRIES", "")  # `VAR= command` means the default, as unset does
    assert settings.HF_RETRIES.get() == 5


@pytest.mark.parametrize(("setting", "raw", "value"), [
    (settings.LEASE_TTL_SECONDS, "30", 30.0),
    (settings.LEASE_TTL_SECONDS, "0.5", 0.5),
    (settings.S3_RETRY_SECONDS, "0", 0.0),
    (settings.S3_RETRY_SECONDS, "3", 3.0),
    (settings.HF_RETRIES, "0", 0),
    (settings.HF_RETRIES, " 3 ", 3),
    (settings.RAY_CPUS, "4", 4),
    (settings.VERBOSE, "1", True),
    (settings.VERBOSE, "Yes", True),
    (settings.VERBOSE, "0", False),
    (settings.VERBOSE, "off", False),
    (settings.GSM8K_DIR, "/data/gsm8k", Path("/data/gsm8k")),
    (settings.LOG_DIR, "logs", Path("logs")),
    (settings.API_KEY, "sk-1 2", "sk-1 2"),
    (settings.HARDENING, "full", "full"),
], ids=lambda v: v.name if isinstance(v, settings.Setting) else repr(v))
def test_values_are_parsed_when_read(clean_env, setting, raw, value):
    clean_env.setenv(setting.name, raw)
    assert setting.get() == value


@pytest.mark.parametrize(("setting", "raw", "expected"), [
    (settings.LEASE_TTL_SECONDS, "abc", "a number of seconds, more than 0"),
    (settings.LEASE_TTL_SECONDS, "0", "a number of seconds, more than 0"),
    (settings.LEASE_TTL_SECONDS, "nan", "a number of seconds, more than 0"),
    (settings.S3_RETRY_SECONDS, "-1", "a number of seconds, 0 or more"),
    (settings.S3_RETRY_SECONDS, "inf", "a number of seconds, 0 or more"),
    (settings.HF_RETRIES, "many", "a number of retries, 0 or more"),
    (settings.HF_RETRIES, "2.5", "a number of retries, 0 or more"),
    (settings.HF_RETRIES, "-1", "a number of retries, 0 or more"),
    (settings.RAY_CPUS, "0", "a whole number of CPUs, at least 1"),
    (settings.VERBOSE, "maybe", "1, true, yes or on (or 0, false, no, off)"),
    (settings.HARDENING, "quick", "`full`"),
], ids=lambda v: v.name if isinstance(v, settings.Setting) else repr(v))
def test_a_malformed_value_is_one_line_naming_the_variable(clean_env, setting, raw, expected):
    clean_env.setenv(setting.name, raw)
    with pytest.raises(SettingError) as caught:
        setting.get()
    assert str(caught.value) == f"{setting.name}={raw!r}: expected {expected}"
    assert isinstance(caught.value, RequantError)  # the CLI prints it as one line, exit status 2


def test_a_value_with_control_characters_is_escaped_in_the_error(clean_env):
    clean_env.setenv("REQUANT_LEASE_TTL_SECONDS", "12\x1b[2J")
    with pytest.raises(SettingError, match=r"^REQUANT_LEASE_TTL_SECONDS='12\\\\x1b\[2J': expected") as caught:
        settings.LEASE_TTL_SECONDS.get()
    assert "\x1b" not in str(caught.value)


def test_readers_see_the_environment_at_call_time_not_at_import(clean_env, tmp_path):
    from requant.io import hf, s3
    from requant.io.storage import LocalDir
    from requant.lease import Lease
    from requant.progress import default_log_dir

    clean_env.setenv("REQUANT_LEASE_TTL_SECONDS", "7")
    assert Lease(LocalDir(tmp_path), "lease", "k", "out").ttl == 7.0
    assert Lease(LocalDir(tmp_path), "lease", "k", "out", ttl=3).ttl == 3
    clean_env.setenv("REQUANT_LOG_DIR", str(tmp_path / "logs"))
    assert default_log_dir() == tmp_path / "logs"
    clean_env.setenv("REQUANT_HF_RETRIES", "2")
    assert hf._retries() == 2

    from botocore.exceptions import EndpointConnectionError

    def unreachable():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    clean_env.setenv("REQUANT_S3_RETRY_SECONDS", "0")
    with pytest.raises(RequantError, match="object storage unreachable for 0s"):
        s3._retrying("s3://bucket/x", unreachable)
    clean_env.setenv("REQUANT_S3_RETRY_SECONDS", "soon")
    with pytest.raises(SettingError, match="^REQUANT_S3_RETRY_SECONDS='soon': expected"):
        s3._retrying("s3://bucket/x", unreachable)


def test_the_api_key_and_gsm8k_copy_come_from_settings(clean_env, tmp_path):
    from requant.api_key import api_key
    from requant.evaluation.gsm8k import find_local_gsm8k

    assert api_key() is None
    clean_env.setenv("OPENAI_API_KEY", "sk-openai")
    assert api_key() is None and api_key(openai_fallback=True) == "sk-openai"
    clean_env.setenv("REQUANT_API_KEY", "sk-requant")
    assert api_key(openai_fallback=True) == "sk-requant"
    clean_env.setenv("REQUANT_GSM8K_DIR", str(tmp_path))
    assert find_local_gsm8k() == tmp_path


def test_child_process_variables_are_the_declared_names(tmp_path):
    from requant.engines import vllm_probe
    from requant.engines.vllm_cpu import probe_env

    assert (vllm_probe.ENV, vllm_probe.LAYERS_ENV) == (settings.VLLM_PROBE.name, settings.VLLM_PROBE_LAYERS.name)
    env, records = probe_env(tmp_path, reference_layers=tmp_path / "ref.jsonl")
    assert env[settings.VLLM_PROBE.name] == str(records)
    assert env[settings.VLLM_PROBE_LAYERS.name] == str(tmp_path / "ref.jsonl")


# --- the whole tree -----------------------------------------------------------------------------------------------

def _files(tops: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    found = []
    for top in tops:
        found += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in suffixes
                  and "__pycache__" not in p.parts]
    return sorted(found)


def environ_reads(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of each REQUANT_* variable the module reads from ``os.environ`` (``get``, ``[...]``, ``in``,
    ``pop``) or ``os.getenv``, by literal or through a module-level string constant."""
    tree = ast.parse(source)
    constants = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                 for t in node.targets if isinstance(t, ast.Name)}

    def is_environ(node: ast.AST) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr == "environ")
                or (isinstance(node, ast.Name) and node.id == "environ"))

    def names(node: ast.AST) -> list[str]:
        strings = [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        strings += [constants[n.id] for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in constants]
        return [m for s in strings for m in NAME.findall(s) if s.startswith("REQUANT_")]

    reads = []
    for node in ast.walk(tree):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop") and is_environ(func.value):
                keys = [node.args[0]]
            elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                    isinstance(func, ast.Name) and func.id == "getenv"):
                keys = [node.args[0]]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_environ(node.value):
            keys = [node.slice]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                and any(is_environ(c) for c in node.comparators):
            keys = [node.left]
        reads += [(node.lineno, name) for key in keys for name in names(key)]
    return reads


@pytest.mark.parametrize(("source", "found"), [
    ('import os\nx = os.environ.get("REQUANT_X", "1")\n', [(2, "REQUANT_X")]),
    ('import os\nx = os.environ["REQUANT_X"]\n', [(2, "REQUANT_X")]),
    ('import os\nx = os.getenv("REQUANT_X")\n', [(2, "REQUANT_X")]),
    ('import os\nx = "REQUANT_X" in os.environ\n', [(2, "REQUANT_X")]),
    ('from os import environ\nx = environ.get("REQUANT_X")\n', [(2, "REQUANT_X")]),
    ('import os\nENV = "REQUANT_X"\n\ndef f():\n    return os.environ.get(ENV)\n', [(5, "REQUANT_X")]),
    ('import os\nx = os.environ.get("HOME")\n', []),
    ('import os\nenv = {**os.environ, "REQUANT_HOME": "/x"}\nos.environ["REQUANT_Y"] = "1"\n', []),
    ('import os\nx = [k for k in os.environ if k.startswith("REQUANT_")]\n', []),
])
def test_the_guard_finds_reads_by_literal_or_constant_and_not_writes(source, found):
    assert environ_reads(source) == found


def test_no_product_module_reads_a_requant_variable_itself():
    found: dict[str, set[str]] = {}
    lines = []
    for path in _files(PRODUCT, (".py",)):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        for line, name in environ_reads(path.read_text()):
            found.setdefault(name, set()).add(rel)
            if rel not in PENDING.get(name, ()):
                lines.append(f"{rel}:{line} reads {name}: use settings.{ATTRIBUTE[name]}.get()" if name in ATTRIBUTE
                             else f"{rel}:{line} reads {name}, which requant/settings.py does not declare")
    assert not lines, "read REQUANT_* variables through requant.settings:\n" + "\n".join(lines)
    done = sorted(name for name in PENDING if name not in found)
    assert not done, f"no longer read directly, remove from PENDING in {Path(__file__).name}: {done}"


def test_every_requant_variable_mentioned_or_read_is_declared():
    undeclared: dict[str, set[str]] = {}
    mentioning = _files(MENTIONS, (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt"))
    mentioning += [ROOT / f for f in MENTION_FILES if (ROOT / f).is_file()]
    for path in mentioning:
        for name in set(NAME.findall(path.read_text(errors="replace"))) - set(settings.BY_NAME):
            undeclared.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    for path in _files(("tests",), (".py",)):  # the tests set made-up names too (the flow's secret filter)
        for _, name in environ_reads(path.read_text()):
            if name not in settings.BY_NAME:
                undeclared.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    assert not undeclared, f"declare these in requant/settings.py: {undeclared}"
