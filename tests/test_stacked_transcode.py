"""Small INT4 modules of one shape go through the kernels stacked along their rows (one call for many): the same
outputs and error statistics as one call per module for every recipe's targets, and bad input still fails naming
the module's tensor. The bytes against AMD Quark's own export are checked in tests/test_convert_vs_quark.py."""

from __future__ import annotations

import math

import pytest
import torch

from requant import job as job_module
from requant.errors import CheckpointError
from requant.io.safetensors import read_tensor
from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe


def _int4_tasks(upstream, recipe, quark_version=None):
    storage = LocalDir(upstream)
    plan = build_plan(storage, load_recipe(recipe, quark_version))
    layer = max(plan.jobs, key=lambda j: sum(t.kind == "int4" for t in j.tasks))
    tasks = [t for t in layer.tasks if t.kind == "int4"]
    inputs = [[read_tensor(storage, e) for e in job_module._read_order(t)] for t in tasks]
    return tasks, inputs


def _stacked_calls(monkeypatch) -> list[int]:
    sizes: list[int] = []
    real = job_module._transcode_int4_stack

    def counting(tasks, *args):
        sizes.append(len(tasks))
        return real(tasks, *args)

    monkeypatch.setattr(job_module, "_transcode_int4_stack", counting)
    return sizes


@pytest.mark.parametrize("recipe", ["kimi-k2.6-mxfp4", "fp8-reference", "bf16-staging"])
def test_stacked_modules_equal_one_call_each(tiny_upstream, recipe, monkeypatch):
    tasks, inputs = _int4_tasks(tiny_upstream, recipe)
    sizes = _stacked_calls(monkeypatch)
    stacked = job_module._transcode_batch(tasks, inputs, "up", "cpu")
    assert sum(sizes) == len(tasks) and len(sizes) < len(tasks) / 4  # the experts really went through stacked
    for task, task_inputs, (outputs, stat) in zip(tasks, inputs, stacked):
        alone, alone_stat = job_module._transcode_inputs(task, task_inputs, "up", "cpu")
        assert [o.dtype for o in outputs] == [o.dtype for o in alone] and [o.shape for o in outputs] == [o.shape for o in alone]
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(outputs, alone)), task.name
        if alone_stat is None:
            assert stat is None
        else:
            assert (stat.name, stat.target, stat.rows_sampled, stat.rows) == (task.name, task.target, alone_stat.rows_sampled, alone_stat.rows)
            assert stat.snr_db == alone_stat.snr_db or math.isclose(stat.snr_db, alone_stat.snr_db, rel_tol=1e-12)


@pytest.mark.parametrize("quark_version", ["0.11", "0.13"])
def test_the_error_statistics_are_the_snr_of_the_reference_decodes(tiny_upstream, quark_version):
    """Each INT4 module's SNR (stacked or alone, measured by the compiled kernel for MXFP4 on a CPU) is that of its
    sampled rows decoded by the reference decoders: the INT4 decode Quark's release quantizes (BF16 for 0.11, the
    exact FP32 for 0.13) against the decode of the MXFP4 written."""
    from requant.formats.int4 import dequantize_int4
    from requant.formats.mxfp4 import dequantize_mxfp4

    tasks, inputs = _int4_tasks(tiny_upstream, "kimi-k2.6-mxfp4", quark_version)
    dtype = torch.float32 if quark_version == "0.13" else torch.bfloat16
    checked = 0
    for task, task_inputs, (outputs, stat) in zip(tasks, inputs, job_module._transcode_batch(tasks, inputs, "up", "cpu")):
        if task.target != "mxfp4":
            continue
        _, scale, packed = task_inputs
        rows = job_module._sample_rows(task.shape[0], "cpu")
        x = dequantize_int4(packed[rows], scale[rows], task.shape[1], dtype=dtype).double()
        y = dequantize_mxfp4(outputs[0][rows], outputs[1][rows]).double()
        expected = 10 * math.log10(float(x.square().sum()) / float((x - y).square().sum()))
        assert math.isclose(stat.snr_db, expected, rel_tol=1e-9), task.name
        checked += 1
    assert checked == 24  # tiny: 8 experts x 3 projections in its largest layer


@pytest.mark.parametrize("which", ["scale", "shape"])
def test_bad_module_in_a_stack_is_named(tiny_upstream, which):
    tasks, inputs = _int4_tasks(tiny_upstream, "kimi-k2.6-mxfp4")
    bad = len(tasks) // 2
    shape, scale, packed = inputs[bad]
    if which == "scale":
        scale = scale.clone()
        scale[0, 0] = float("inf")
        name = tasks[bad].inputs[1].name
    else:
        shape = torch.tensor([shape[0] + 1, shape[1]], dtype=shape.dtype)
        name = tasks[bad].inputs[2].name
    inputs[bad] = [shape, scale, packed]
    with pytest.raises(CheckpointError) as err:
        job_module._transcode_batch(tasks, inputs, "up", "cpu")
    assert name in str(err.value) and "\n" not in str(err.value)
