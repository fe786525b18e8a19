"""Releasing a checkpoint to the Hugging Face Hub: gated on its evaluation, streamed from storage, one verified
commit (:func:`release`); the releases recorded beside the checkpoint (:mod:`requant.release.record`)."""

from requant.release.gate import GateDecision, evaluation_verdict, release_gate
from requant.release.record import ReleaseRecord, latest_record, read_records
from requant.release.target import ReleaseTarget, parse_target
from requant.release.upload import ReleaseOptions, ReleaseResult, release

__all__ = ["GateDecision", "ReleaseOptions", "ReleaseRecord", "ReleaseResult", "ReleaseTarget", "evaluation_verdict",
           "latest_record", "parse_target", "read_records", "release", "release_gate"]
