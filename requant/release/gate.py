"""Whether a checkpoint may be released: only one its own evaluation judged PASS, unless a person forces it and
says why (the card and the release record then carry the reason)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from requant.errors import RequantError
from requant.manifest import EVAL_DIR


@dataclass(frozen=True)
class GateDecision:
    verdict: str                 # PASS, FAIL, INCONCLUSIVE, SMOKE-FAILED or NOT-EVALUATED
    forced: str | None = None    # the reason a person gave for releasing past a verdict other than PASS

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"


def evaluation_verdict(manifest: dict[str, Any]) -> str:
    """The verdict of the evaluation published into the checkpoint (``requant evaluate`` or the flow)."""
    summary = (manifest.get("evaluations") or {}).get(EVAL_DIR)
    if not summary:
        return "NOT-EVALUATED"
    if summary.get("smoke_passed") is False:
        return "SMOKE-FAILED"
    return str(summary.get("verdict") or "NOT-EVALUATED")


def release_gate(manifest: dict[str, Any], where: str, force: str | None = None) -> GateDecision:
    """PASS releases; anything else is refused with one line unless ``force`` gives a reason."""
    verdict = evaluation_verdict(manifest)
    if verdict == "PASS":
        return GateDecision(verdict)
    if force is not None and force.strip():
        return GateDecision(verdict, force.strip())
    why = {"NOT-EVALUATED": "it has no evaluation (run `requant evaluate CANDIDATE --reference REF` first)",
           "SMOKE-FAILED": "its smoke test failed",
           "FAIL": "its GSM8K evaluation failed the gate",
           "INCONCLUSIVE": "its GSM8K evaluation was inconclusive (too few items to rule out the gate's drop)"}
    raise RequantError(f"{where}: not released: {why.get(verdict, f'its evaluation says {verdict}')}; "
                       "--force REASON releases it anyway, saying so in the card")
