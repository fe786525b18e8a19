"""Run lm-eval's ``gsm8k`` task against a served model's OpenAI completions endpoint, once per seed.

The task is lm-eval 0.4.13's own (prompt, ``until`` stop list, greedy, 256 tokens, ``strict-match`` and
``flexible-extract``), driven through ``lm_eval.simple_evaluate`` with the ``local-completions`` model and no
tokenizer. With ``gsm8k_dir`` the data comes from local ``train.jsonl``/``test.jsonl`` through a task file that
includes lm-eval's ``gsm8k.yaml`` and swaps only the dataset, and nothing reaches for the network.

Per seed, ``out_dir/seed-<S>/`` gets lm-eval's per-sample records (``samples.jsonl``) and aggregate results
(``results.json``); ``out_dir/gsm8k.json`` holds the :class:`GSM8KResult` built from them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from requant import settings
from requant.errors import RequantError
from requant.evaluation.results import FILTERS, GSM8KResult
from requant.io.checksums import check_sums
from requant.progress import phase

TASK = "gsm8k"
DATA_FILES = ("train.jsonl", "test.jsonl")
TRAINED_TASK = "requant:trained"  # gsm8k_dir value naming the shipped trained model's task, in TRAINED_TASK_DIR
# The trained model's assets (package data of requant.testing.trained, which tests pin to this path): found by path,
# not by importing the test and demo package, so the product never imports requant.testing.
TRAINED_TASK_DIR = Path(__file__).resolve().parents[1] / "testing" / "trained" / "assets"
CHECKSUMS = "SHA256SUMS"      # sha256sum format; shipped with the copies the tests use
RESULT_FILE = "gsm8k.json"
TASK_DIR = "lm-eval-task"        # under out_dir: the offline task file, kept for provenance
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def server_root(base_url: str) -> str:
    """``http://host:port`` from a server root, a ``/v1`` base URL or the ``/v1/completions`` endpoint."""
    root = base_url.strip().rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if root.endswith(suffix):
            root = root[: -len(suffix)]
            break
    parts = urlsplit(root)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RequantError(f"base URL {base_url!r}: expected http(s)://HOST:PORT[/v1[/completions]]")
    return root


def find_local_gsm8k(start: str | Path | None = None) -> Path | None:
    """A local GSM8K copy: ``$REQUANT_GSM8K_DIR``, else the first ``shared/data/gsm8k`` beside ``start`` (default:
    this source tree) or one of its parents (the workplace keeps one next to the repository), else the copy in the
    repository's tests/data/gsm8k. None if absent."""
    configured = settings.GSM8K_DIR.get()
    if configured is not None:
        return configured
    here = Path(start or __file__).resolve()
    for parent in here.parents:
        # the workplace copy beside the repository, else the repository's own copy (tests/data/gsm8k, MIT)
        for candidate in (parent / "shared" / "data" / "gsm8k", parent / "tests" / "data" / "gsm8k"):
            if (candidate / "test.jsonl").is_file() and (candidate / "train.jsonl").is_file():
                return candidate
    return None


def check_gsm8k_dir(gsm8k_dir: str | Path) -> dict[str, Path]:
    """The split files of a local GSM8K copy, each checked to be JSONL rows with ``question`` and ``answer``, and
    against the copy's SHA256SUMS when it has one. ``requant:trained`` names the task the shipped trained model
    learned (TRAINED_TASK_DIR: GSM8K's schema and answer format, scored by lm-eval's gsm8k task as is)."""
    if str(gsm8k_dir) == TRAINED_TASK:  # the shipped trained model's own task: its SHA256SUMS must be there
        root = TRAINED_TASK_DIR
        check_sums(root, DATA_FILES, "trained model's task", "restore it from git (or rerun make train-model)")
    else:
        root = Path(gsm8k_dir).expanduser().resolve()
        check_checksums(root)
    files = {}
    for name in DATA_FILES:
        path = root / name
        if not path.is_file():
            raise RequantError(f"{path}: GSM8K split file not found (gsm8k_dir must hold {' and '.join(DATA_FILES)})")
        rows = 0
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RequantError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
                if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                        and isinstance(row.get("answer"), str)):
                    raise RequantError(f"{path}:{number}: expected an object with string 'question' and 'answer'")
                rows += 1
        if rows == 0:
            raise RequantError(f"{path}: no rows")
        files[path.stem] = path
    return files


def check_checksums(root: Path) -> None:
    """A copy that ships ``SHA256SUMS`` must match it: both split files listed, each with its sha256."""
    if (root / CHECKSUMS).is_file():
        check_sums(root, DATA_FILES, "GSM8K copy", "restore it")


def write_offline_task(data_files: dict[str, Path], task_dir: Path) -> Path:
    """A task file that is lm-eval's own gsm8k task, reading the given local JSONL files instead of the hub."""
    import lm_eval.tasks

    upstream = Path(lm_eval.tasks.__file__).parent / TASK / f"{TASK}.yaml"
    if not upstream.is_file():
        raise RequantError(f"{upstream}: lm-eval's gsm8k task file is missing (lm-eval {version('lm_eval')})")
    config = {
        "include": str(upstream),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in data_files.items()}},
    }
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / f"{TASK}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (or leave alone, for None) one environment variable, restoring it afterwards."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None and saved is None:
            os.environ.pop(name, None)
        elif value is not None:
            os.environ[name] = saved


@contextmanager
def _hub_offline() -> Iterator[None]:
    """No hub traffic, not even the download-count HEAD request that ``datasets`` sends for its packaged ``json``
    loader. ``datasets`` reads its offline flags at import, so they are set on its config as well as in the
    environment."""
    import datasets.config

    saved = {name: getattr(datasets.config, name) for name in OFFLINE_ENV}
    with ExitStack() as stack:
        for name in OFFLINE_ENV:
            stack.enter_context(_env(name, "1"))
            setattr(datasets.config, name, True)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(datasets.config, name, value)


@contextmanager
def _lm_eval_logging(progress: bool) -> Iterator[None]:
    """lm-eval's logger at WARNING (ERROR and no ``datasets`` progress bars without ``progress``)."""
    import datasets

    logger = logging.getLogger("lm_eval")
    saved_level, saved_bars = logger.level, not datasets.are_progress_bars_disabled()
    logger.setLevel(logging.WARNING if progress else logging.ERROR)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        if saved_bars:
            datasets.enable_progress_bars()


def _json_default(value: Any) -> Any:
    """numpy scalars and the like in lm-eval's output, as plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def item_outcomes(samples: list[dict[str, Any]], where: str) -> tuple[list[int], dict[str, list[int]]]:
    """doc_ids in order and, per filter, 0/1 per doc_id from lm-eval's per-(doc, filter) sample records."""
    by_filter: dict[str, dict[int, int]] = {name: {} for name in FILTERS}
    for record in samples:
        if record.get("filter") in by_filter:
            score = float(record["exact_match"])
            if score not in (0.0, 1.0):
                raise RequantError(f"{where}: doc {record['doc_id']}: exact_match {score} is not 0 or 1")
            by_filter[record["filter"]][int(record["doc_id"])] = int(score)
    doc_ids = sorted(set().union(*by_filter.values()))
    if not doc_ids:
        raise RequantError(f"{where}: no samples for the filters {', '.join(FILTERS)}")
    for name, outcomes in by_filter.items():
        if len(outcomes) != len(doc_ids):
            raise RequantError(f"{where}: filter {name!r} has samples for {len(outcomes)} of {len(doc_ids)} docs")
    return doc_ids, {name: [outcomes[i] for i in doc_ids] for name, outcomes in by_filter.items()}


def _write_seed(seed_dir: Path, output: dict[str, Any]) -> list[dict[str, Any]]:
    """Write one seed's samples.jsonl (lm-eval's records, one per doc and filter) and results.json (the rest of
    its output); return the samples as written, as plain JSON."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record, default=_json_default, ensure_ascii=False) for record in output["samples"][TASK]]
    (seed_dir / "samples.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    aggregate = {key: value for key, value in output.items() if key != "samples"}
    (seed_dir / "results.json").write_text(json.dumps(aggregate, default=_json_default, indent=2) + "\n")
    return [json.loads(line) for line in lines]


def run_gsm8k(base_url: str, model: str, *, variant: str, seeds: Sequence[int] = (42, 1234, 7777),
              num_fewshot: int = 3, limit: int | None = None, gsm8k_dir: str | Path | None = None, out_dir: str | Path,
              num_concurrent: int = 1, max_retries: int = 3, timeout: float = 600, api_key: str | None = None,
              progress: bool = True) -> GSM8KResult:
    """Evaluate ``model`` served at ``base_url`` on GSM8K once per seed; write and return the result.

    ``api_key`` reaches lm-eval only through ``OPENAI_API_KEY`` for the duration of the call (None leaves the
    environment as it is); it is never written to ``out_dir``.
    """
    root = server_root(base_url)
    seeds = [int(seed) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise RequantError(f"seeds must be distinct and non-empty, got {seeds}")
    if num_fewshot < 0 or (limit is not None and limit < 1):
        raise RequantError(f"num_fewshot must be >= 0 and limit None or >= 1, got {num_fewshot} and {limit}")
    out_dir = Path(out_dir)
    data_files = check_gsm8k_dir(gsm8k_dir) if gsm8k_dir is not None else None

    import lm_eval
    from lm_eval.tasks import TaskManager

    with ExitStack() as stack:
        stack.enter_context(_lm_eval_logging(progress))
        stack.enter_context(_env("OPENAI_API_KEY", api_key))
        if data_files is None:
            task_manager = TaskManager()
        else:
            stack.enter_context(_hub_offline())
            task_dir = write_offline_task(data_files, out_dir / TASK_DIR).parent
            task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        model_args = {"model": model, "base_url": f"{root}/v1/completions", "tokenizer_backend": None,
                      "tokenized_requests": False, "num_concurrent": num_concurrent, "max_retries": max_retries,
                      "timeout": timeout}
        scores: dict[str, dict[str, float]] = {name: {} for name in FILTERS}
        items: dict[str, dict[str, list[int]]] = {name: {} for name in FILTERS}
        wall_seconds, sample_paths, doc_ids = {}, {}, None
        shown = stack.enter_context(phase(f"GSM8K {variant}", total=len(seeds), unit="seeds"))
        for seed in seeds:
            shown.note(f"seed {seed}")
            start = time.perf_counter()
            output = lm_eval.simple_evaluate(
                model="local-completions", model_args=dict(model_args), tasks=[TASK], num_fewshot=num_fewshot,
                limit=limit, log_samples=True, task_manager=task_manager, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            wall_seconds[str(seed)] = time.perf_counter() - start
            seed_dir = out_dir / f"seed-{seed}"
            samples = _write_seed(seed_dir, output)
            sample_paths[str(seed)] = f"seed-{seed}/samples.jsonl"
            where = str(seed_dir / "samples.jsonl")
            seed_doc_ids, seed_items = item_outcomes(samples, where)
            if doc_ids is not None and seed_doc_ids != doc_ids:
                raise RequantError(f"{where}: evaluated doc_ids differ from the first seed's")
            doc_ids = seed_doc_ids
            for name in FILTERS:
                score = float(output["results"][TASK][f"exact_match,{name}"])
                mean = sum(seed_items[name]) / len(seed_items[name])
                if abs(mean - score) > 1e-9:
                    raise RequantError(f"{where}: per-item mean {mean} of {name!r} differs from lm-eval's "
                                       f"exact_match {score}")
                scores[name][str(seed)] = score
                items[name][str(seed)] = seed_items[name]
            shown.advance(note=f"seed {seed}: " + ", ".join(f"{name} {scores[name][str(seed)]:.3f}" for name in FILTERS))
        shown.result(", ".join(f"{name} {sum(scores[name].values()) / len(seeds):.3f}" for name in FILTERS)
                     + f" (mean of {len(seeds)} seeds x {len(doc_ids or [])} items)")

    result = GSM8KResult(variant=variant, model=model, base_url=f"{root}/v1", num_fewshot=num_fewshot, limit=limit,
                         seeds=seeds, doc_ids=doc_ids, scores=scores, items=items, wall_seconds=wall_seconds,
                         samples=sample_paths, lm_eval_version=version("lm_eval"))
    (out_dir / RESULT_FILE).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def load_result(out_dir: str | Path) -> GSM8KResult:
    """The :class:`GSM8KResult` that :func:`run_gsm8k` wrote to ``out_dir``."""
    path = Path(out_dir) / RESULT_FILE
    try:
        return GSM8KResult.from_json(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise RequantError(f"{path}: no GSM8K result here (run the evaluation first)") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise RequantError(f"{path}: not a GSM8K result ({exc})") from exc
