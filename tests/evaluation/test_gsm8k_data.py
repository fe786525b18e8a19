"""The GSM8K rows shipped in tests/data/gsm8k match their SHA256SUMS, and the loader (check_gsm8k_dir, used by
``requant eval`` and the evaluation flow) refuses a copy whose bytes no longer match it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from requant.errors import RequantError
from requant.evaluation.downstream import EvalSettings
from requant.evaluation.gsm8k import DATA_FILES, check_gsm8k_dir, find_local_gsm8k, run_gsm8k

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "gsm8k"


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        digest, name = line.split()
        sums[name.lstrip("*")] = digest
    return sums


@pytest.mark.parametrize("copy", ["shipped", "used by the tests"])
def test_rows_match_their_sha256sums(copy):
    root = SHIPPED if copy == "shipped" else find_local_gsm8k(__file__)
    sums = read_sums(root / "SHA256SUMS")
    assert sorted(sums) == sorted(DATA_FILES)
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name
    assert check_gsm8k_dir(root).keys() == {"train", "test"}


def _flip_a_digit(path: Path) -> None:
    """One bit flipped in an answer's digit ('2' -> '3'): still valid JSONL, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    at = data.index(b"#### 2", len(data) // 2) + 5
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def intact_copy(tmp_path) -> Path:
    dst = tmp_path / "gsm8k"
    shutil.copytree(SHIPPED, dst)
    return dst


def test_the_intact_copy_loads(intact_copy):
    assert set(check_gsm8k_dir(intact_copy).values()) == {intact_copy.resolve() / name for name in DATA_FILES}


@pytest.mark.parametrize("split", DATA_FILES)
def test_a_flipped_byte_is_refused_clearly(intact_copy, split, tmp_path):
    _flip_a_digit(intact_copy / split)
    for load in (lambda: check_gsm8k_dir(intact_copy),
                 lambda: EvalSettings(gsm8k_dir=str(intact_copy)).protocol_key("reference"),
                 lambda: run_gsm8k("http://127.0.0.1:9", "m", variant="x", gsm8k_dir=intact_copy,
                                   out_dir=tmp_path / "out")):
        with pytest.raises(RequantError) as info:
            load()
        message = str(info.value)
        assert f"{split}: sha256" in message and "does not match SHA256SUMS" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_sha256sums_must_list_both_splits(intact_copy):
    sums = intact_copy / "SHA256SUMS"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "test.jsonl" not in line))
    with pytest.raises(RequantError, match="does not list test.jsonl"):
        check_gsm8k_dir(intact_copy)
