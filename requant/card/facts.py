"""The facts a model card is rendered from: what a checkpoint says about itself, read from its files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from requant.errors import RequantError
from requant.manifest import CONFIG_FILE, UPSTREAM_CARD, eval_path, is_evaluation, read_manifest

if TYPE_CHECKING:
    from requant.evaluation.compare import Comparison

LICENSE_FILE = re.compile(r"(?i)(licen[cs]e|copying)([-.][\w.-]+)?")  # top-level licence files the upstream may ship


@dataclass(frozen=True)
class ReleaseFacts:
    """What the release step adds: where the card is published, and why a release went past a gate that did
    not PASS (None: it did not)."""

    repo_id: str | None = None
    forced: str | None = None


@dataclass(frozen=True)
class CardFacts:
    manifest: dict[str, Any]
    config: dict[str, Any]                  # the output config.json
    license_file: str | None = None         # the upstream's licence file, copied verbatim (e.g. LICENSE)
    license_text: str | None = None
    upstream_meta: dict[str, Any] | None = None  # the upstream card's front matter (UPSTREAM_README.md)
    report: dict[str, Any] | None = None    # eval/report.json: comparison, smoke, context, candidate, reference
    comparison: Comparison | None = None    # the report's comparison, read back
    smoke: dict[str, Any] | None = None     # the smoke test (eval/smoke.json; also when GSM8K never ran)
    release: ReleaseFacts | None = None

    @classmethod
    def from_checkpoint(cls, storage, manifest: dict[str, Any] | None = None,
                        release: ReleaseFacts | None = None) -> CardFacts:
        """The facts of the checkpoint at ``storage`` (a directory or s3://); ``manifest`` when it is not
        written yet (conversion) or is about to be rewritten (publishing an evaluation). Files count when the
        manifest lists them."""
        manifest = read_manifest(storage) if manifest is None else manifest
        names = set(manifest.get("outputs", {}))
        license_file = next((n for n in sorted(names) if LICENSE_FILE.fullmatch(n)), None)
        report = comparison = smoke = None
        if any(is_evaluation(n) for n in names):
            # the evaluation's modules (scipy, matplotlib, lm-eval) load only for a checkpoint that has one
            from requant.evaluation.downstream import REPORT_JSON, SMOKE_JSON
            from requant.evaluation.report import comparison_from_json

            if eval_path(REPORT_JSON) in names:
                where = f"{storage.uri}/{eval_path(REPORT_JSON)}"
                report = _json(storage, eval_path(REPORT_JSON))
                if not isinstance(report, dict):
                    raise RequantError(f"{where}: not a report requant wrote (expected an object)")
                comparison = comparison_from_json(report.get("comparison"), where)
            smoke = _json(storage, eval_path(SMOKE_JSON)) if eval_path(SMOKE_JSON) in names else None
        return cls(
            manifest=manifest, config=_json(storage, CONFIG_FILE), license_file=license_file,
            license_text=storage.read_bytes(license_file).decode("utf-8", "replace") if license_file else None,
            upstream_meta=front_matter(storage.read_bytes(UPSTREAM_CARD).decode("utf-8", "replace"))
            if UPSTREAM_CARD in names else {},
            report=report, comparison=comparison, smoke=report.get("smoke") if report else smoke, release=release)


def _json(storage, name: str) -> Any:
    try:
        return json.loads(storage.read_bytes(name))
    except ValueError as exc:
        raise RequantError(f"{storage.uri}/{name}: not valid JSON ({exc})") from exc


def front_matter(card: str) -> dict[str, Any]:
    """A card's YAML metadata block; {} when it has none or it is not a mapping (an upstream's card is theirs)."""
    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", card, re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
