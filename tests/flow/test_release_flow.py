"""The requantize flow's release step on real services (SeaweedFS, Ray, Prefect, the local Hub): a checkpoint the
gate did not pass is not released, and the reason lands beside it, where the watcher's ledger reads it. (A PASS
released from S3: tests/flow/test_evaluate_flow.py; the watcher releasing through a worker: tests/ops.)"""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi

import requant
from requant.errors import RequantError
from requant.flows.watch import _release_state
from requant.release import read_records
from requant.testing.evaluations import attach_evaluation

pytestmark = pytest.mark.services


def test_an_unevaluated_checkpoint_is_not_released_and_the_ledger_says_why(prefect_api, s3_tiny, local_hub,
                                                                           clean_prefix):
    from requant.flows.requantize import requantize

    output = f"{clean_prefix}/kimi-k2.6-mxfp4"
    repo = f"testorg/unevaluated-{clean_prefix.rsplit('/', 1)[-1]}"
    state = requantize(upstream=s3_tiny, output=output, recipe="kimi-k2.6-mxfp4", progress=False,
                       evaluation={"enabled": False}, release_to=f"hf://{repo}", return_state=True)
    assert state.is_failed()
    with pytest.raises(RequantError, match="not released: it has no evaluation"):
        state.result()
    assert not HfApi(endpoint=local_hub.url, token=local_hub.token).repo_exists(repo)
    requant.verify(output)                                              # the checkpoint itself is published
    assert _release_state(output).startswith("not released: ") and "no evaluation" in _release_state(output)


def test_a_gate_fail_stops_the_run_before_the_release_and_the_ledger_says_why(prefect_api, s3_tiny, local_hub,
                                                                              clean_prefix, monkeypatch, tmp_path):
    """The evaluation publishes its FAIL and stops the run (as the evaluate flow does): nothing is released, and the
    refusal, with the gate's reason, is recorded beside the checkpoint."""
    import requant.flows.evaluate as evaluate_flow
    from requant.flows.requantize import requantize

    def evaluation_that_fails(checkpoint, reference, **kwargs):
        attach_evaluation(checkpoint, "FAIL", tmp_path)
        raise RequantError(f"GSM8K gate failed for {checkpoint}: flexible-extract: -30.00 pp is significant")

    monkeypatch.setattr(evaluate_flow, "evaluate", evaluation_that_fails)
    output = f"{clean_prefix}/kimi-k2.6-mxfp4"
    repo = f"testorg/failed-{clean_prefix.rsplit('/', 1)[-1]}"
    with pytest.raises(RequantError, match="GSM8K gate failed"):
        requantize(upstream=s3_tiny, output=output, recipe="kimi-k2.6-mxfp4", progress=False,
                   evaluation={"reference_output": f"{clean_prefix}/fp8-reference"}, release_to=f"hf://{repo}")
    assert not HfApi(endpoint=local_hub.url, token=local_hub.token).repo_exists(repo)
    record = read_records(requant.open_storage(output))[-1]
    assert record.verdict == "FAIL" and "GSM8K gate failed" in record.refused and record.commit is None
    assert _release_state(output) == f"not released: {record.refused}"
