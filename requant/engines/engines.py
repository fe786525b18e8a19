"""Launch a serving engine for a checkpoint, wait until it answers, warm it up, and tear it down.

Engines are command templates in ``engines.yaml`` (reference, vllm, atom, sglang); a user YAML with the
same shape adds or overrides entries. ``attach`` uses an already running server instead. The same
lifecycle runs the reference server in tests and a real engine on a GPU node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Self

import httpx
import yaml

from requant.errors import RequantError
from requant.processes import terminate_group

PLACEHOLDERS = ("python", "model", "host", "port", "served_model_name", "tp", "max_model_len")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    command: tuple[str, ...]
    local_model: bool = True
    api_key_env: str | None = None
    trust_remote_code_flag: str | None = None
    startup_timeout_s: float = 600.0
    description: str = ""
    python_env: str | None = None    # variable naming the interpreter {python} stands for (default: requant's own)
    python_venv: str | None = None   # else this virtualenv, in the working directory or requant's checkout
    env: tuple[tuple[str, str], ...] = ()  # defaults for the engine's environment (the caller's values win)

    def python(self) -> str:
        """The interpreter ``{python}`` stands for: requant's own unless the engine lives in its own venv."""
        if self.python_env and os.environ.get(self.python_env):
            return os.environ[self.python_env]
        if not self.python_venv:
            return sys.executable
        return venv_python(f"engine {self.name!r}", self.python_venv, self.python_env, "engine-venv")


def venv_python(owner: str, venv: str, env_var: str | None, make_target: str) -> str:
    """``$env_var``, else the interpreter of ``venv`` in the working directory or requant's checkout (an engine's
    own pinned virtualenv, built by ``make make_target``)."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / venv / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    hint = f"set {env_var}, or " if env_var else ""
    raise RequantError(f"{owner}: no interpreter; {hint}create {venv}/ (make {make_target})")


def load_engines(path: str | Path | None = None) -> dict[str, EngineSpec]:
    """Built-in engines, plus (overriding) those of a user YAML ``{engines: {name: {command: [...], ...}}}``."""
    sources = [("engines.yaml", resources.files("requant.engines").joinpath("engines.yaml").read_text())]
    if path is not None:
        try:
            sources.append((str(path), Path(path).read_text()))
        except OSError as exc:
            raise RequantError(f"{path}: cannot read engine file ({exc.strerror})") from exc
    engines: dict[str, EngineSpec] = {}
    for where, text in sources:
        try:
            data = yaml.safe_load(text)
            items = data["engines"].items()
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            raise RequantError(f"{where}: expected a mapping 'engines: {{name: {{command: [...]}}}}'") from exc
        for name, raw in items:
            engines[name] = _spec(name, raw, where)
    return engines


def _spec(name: str, raw: dict, where: str) -> EngineSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("command"), list) or not raw["command"]:
        raise RequantError(f"{where}: engine {name!r} needs a non-empty 'command' list")
    unknown = set(raw) - {"command", "local_model", "api_key_env", "trust_remote_code_flag", "startup_timeout_s", "description",
                          "python_env", "python_venv", "env"}
    if unknown:
        raise RequantError(f"{where}: engine {name!r} has unknown keys {sorted(unknown)}")
    env = raw.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in env.items()):
        raise RequantError(f"{where}: engine {name!r}: 'env' must map variable names to strings")
    command = tuple(str(part) for part in raw["command"])
    for part in command:
        try:
            part.format(**{k: "" for k in PLACEHOLDERS})
        except (KeyError, IndexError, ValueError) as exc:
            raise RequantError(f"{where}: engine {name!r}: bad placeholder in {part!r} (allowed: {', '.join(PLACEHOLDERS)})") from exc
    return EngineSpec(name, command, bool(raw.get("local_model", True)), raw.get("api_key_env"),
                      raw.get("trust_remote_code_flag"), float(raw.get("startup_timeout_s", 600)), raw.get("description", ""),
                      raw.get("python_env"), raw.get("python_venv"), tuple((k, str(v)) for k, v in env.items()))


def build_command(spec: EngineSpec, model: str, *, host: str = "127.0.0.1", port: int, served_model_name: str,
                  tp: int = 1, max_model_len: int = 16384, trust_remote_code: bool = False,
                  extra_args: tuple[str, ...] = ()) -> list[str]:
    values = {"python": spec.python() if "{python}" in spec.command else sys.executable, "model": model, "host": host, "port": port,
              "served_model_name": served_model_name, "tp": tp, "max_model_len": max_model_len}
    command = [part.format(**values) for part in spec.command]
    if trust_remote_code:
        if not spec.trust_remote_code_flag:
            raise RequantError(f"engine {spec.name!r} has no trust-remote-code flag")
        command.append(spec.trust_remote_code_flag)
    return command + list(extra_args)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningEngine:
    """A server answering at ``base_url`` (root, no /v1); ``process`` is None when attached, not launched."""

    base_url: str
    served_model_name: str
    engine: str
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    api_key: str | None = field(default=None, repr=False)
    startup_seconds: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        terminate_group(self.process.pid, grace_s, self.process)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(spec: EngineSpec, model: str, *, served_model_name: str, log_dir: str | Path, host: str = "127.0.0.1",
           port: int | None = None, tp: int = 1, max_model_len: int = 16384, api_key: str | None = None,
           trust_remote_code: bool = False, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
           warmup: bool = True) -> RunningEngine:
    """Start the engine, wait for /health (failing fast if it exits), optionally warm it up."""
    port = port or free_port(host)
    if spec.local_model and "://" in model:
        model = str(materialize(model, Path(log_dir) / "model"))
    command = build_command(spec, model, host=host, port=port, served_model_name=served_model_name, tp=tp,
                            max_model_len=max_model_len, trust_remote_code=trust_remote_code, extra_args=extra_args)
    child_env = {**dict(spec.env), **os.environ, **(env or {})}
    if model.startswith("s3://"):  # the engine reads object storage itself: with the flow's own identity
        from requant.io.s3 import client_env

        child_env = {k: v for k, v in child_env.items() if not k.startswith("AWS_")} | client_env() | (env or {})
    if api_key:
        if not spec.api_key_env:
            raise RequantError(f"engine {spec.name!r} has no api_key_env; cannot pass an API key safely")
        child_env[spec.api_key_env] = api_key
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(log_dir) / f"{spec.name}-{port}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        except FileNotFoundError as exc:
            raise RequantError(f"engine {spec.name!r}: {command[0]!r} not found; is it installed on this node?") from exc
    running = RunningEngine(f"http://{host}:{port}", served_model_name, spec.name, proc, log_path, api_key)
    try:
        wait_healthy(running, spec.startup_timeout_s)
        running.startup_seconds = time.monotonic() - started
        if warmup:
            warm_up(running)
    except BaseException:
        running.stop()
        raise
    return running


def attach(base_url: str, served_model_name: str | None = None, api_key: str | None = None,
           timeout_s: float = 60.0) -> RunningEngine:
    """An already running OpenAI-compatible server; the model name defaults to its first /v1/models entry."""
    running = RunningEngine(base_url.rstrip("/").removesuffix("/v1"), served_model_name or "", "external", api_key=api_key)
    wait_healthy(running, timeout_s)
    if not served_model_name:
        models = httpx.get(f"{running.base_url}/v1/models", headers=running.headers(), timeout=30).json()
        running.served_model_name = models["data"][0]["id"]
    return running


def wait_healthy(running: RunningEngine, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if running.process is not None and running.process.poll() is not None:
            tail = running.log_path.read_text(errors="replace")[-2000:] if running.log_path else ""
            raise RequantError(f"engine {running.engine} exited with status {running.process.returncode} before "
                               f"becoming healthy; log {running.log_path}:\n{tail}")
        try:
            r = httpx.get(f"{running.base_url}/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.25)
    raise RequantError(f"engine {running.engine} at {running.base_url} not healthy after {timeout_s:.0f}s ({last})")


def warm_up(running: RunningEngine) -> None:
    r = httpx.post(f"{running.base_url}/v1/completions", headers=running.headers(), timeout=600,
                   json={"model": running.served_model_name, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    if r.status_code != 200:
        raise RequantError(f"engine {running.engine}: warm-up completion failed with HTTP {r.status_code}: {r.text[:300]}")


def materialize(uri: str, dst: Path) -> Path:
    """A local copy of a checkpoint for engines that read only local paths (skipped when already complete)."""
    from requant.io import storage as storage_module
    from requant.io.paths import check_relative
    from requant.manifest import is_evaluation, is_run_state

    storage = storage_module.open_storage(uri)
    dst.mkdir(parents=True, exist_ok=True)
    for name in storage.list_files():
        if is_run_state(name) or is_evaluation(name):            # run state and evaluation reports
            continue
        check_relative(name, f"{uri}/{name}")      # object names must not escape the copy
        target = dst / name
        if target.exists() and target.stat().st_size == storage.size(name):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        storage.copy_file_to(name, tmp)
        shutil.move(tmp, target)
    return dst
