"""Layer jobs travel to Ray workers pickled (as plain tuples, see ``LayerJob.__reduce__``); what arrives must be
the job that was planned, and must convert to the same bytes."""

from __future__ import annotations

import pickle

import pytest
import ray.cloudpickle

from requant.io.storage import open_storage
from requant.job import run_job
from requant.planning import LayerJob, TensorTask, build_plan
from requant.recipe import load_recipe


@pytest.fixture(scope="module")
def plan(tiny_upstream):
    return build_plan(open_storage(str(tiny_upstream)), load_recipe("kimi-k2.6-mxfp4"))


@pytest.mark.parametrize("dumps", [pickle.dumps, ray.cloudpickle.dumps], ids=["pickle", "ray-cloudpickle"])
def test_jobs_arrive_as_planned(plan, dumps):
    for job in plan.jobs:
        arrived = pickle.loads(dumps(job))
        assert arrived == job and hash(arrived) == hash(job)
        assert type(arrived) is LayerJob and all(type(t) is TensorTask for t in arrived.tasks)
        for sent, got in zip(job.tasks, arrived.tasks):
            # every field, at every level, with its type (a list where a tuple was would still compare unequal
            # in places and hash differently elsewhere)
            assert vars(got) == vars(sent)
            assert [vars(e) for e in got.inputs] == [vars(e) for e in sent.inputs]
            assert [vars(s) for s in got.outputs] == [vars(s) for s in sent.outputs]
            assert all(type(e.shape) is tuple for e in got.inputs) and type(got.shape) is tuple
        assert arrived.bytes_in == job.bytes_in and arrived.bytes_out == job.bytes_out


def test_pickled_job_is_plain_data(plan):
    """No per-tensor class reference in the pickle: Ray's pickler calls a Python hook per such object."""
    job = max(plan.jobs, key=lambda j: len(j.tasks))
    data = pickle.dumps(job)
    assert data.count(b"TensorEntry") == 0 and data.count(b"TensorTask") == 0


def test_arrived_job_converts_to_the_same_bytes(plan, tiny_upstream, tmp_path):
    source = open_storage(str(tiny_upstream))
    job = next(j for j in plan.jobs if any(t.kind == "int4" for t in j.tasks))
    (tmp_path / "sent").mkdir()
    (tmp_path / "arrived").mkdir()
    sent = run_job(job, source, tmp_path / "sent", threads=1)
    arrived = run_job(pickle.loads(ray.cloudpickle.dumps(job)), source, tmp_path / "arrived", threads=1)
    assert (sent.sha256, sent.size) == (arrived.sha256, arrived.size)
    assert [vars(s) for s in sent.stats] == [vars(s) for s in arrived.stats]
