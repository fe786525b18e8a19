"""``SHA256SUMS`` files (``sha256sum``'s format) for data shipped beside the code: the offline GSM8K copies and the
trained model's assets. One reader and one checker, so every shipped folder fails the same way: one line naming
the file that is missing, unlisted or changed."""

from __future__ import annotations

import string
from pathlib import Path

from requant.errors import RequantError
from requant.io.safetensors import sha256_file

SUMS = "SHA256SUMS"


def read_sums(sums: Path) -> dict[str, str]:
    """``{file name: sha256}`` from a ``sha256sum`` listing ("<hex>  <name>", "<hex> *<name>" in binary mode)."""
    listed: dict[str, str] = {}
    for number, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if len(digest) != 64 or any(c not in string.hexdigits for c in digest) or not name:
            raise RequantError(f"{sums}:{number}: not a sha256sum line")
        listed[name] = digest.lower()
    return listed


def write_sums(root: Path) -> Path:
    """List every file directly in ``root`` (but the listing itself) with its sha256."""
    names = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != SUMS)
    path = root / SUMS
    path.write_text("".join(f"{sha256_file(root / name)}  {name}\n" for name in names))
    return path


def check_sums(root: Path, required: tuple[str, ...], what: str, fix: str) -> None:
    """Every file ``root/SHA256SUMS`` lists must exist and match; the ``required`` files must be listed. ``what``
    names the folder in errors ("GSM8K copy"), ``fix`` says what to do about a mismatch."""
    sums = root / SUMS
    if not sums.is_file():
        raise RequantError(f"{sums}: missing; cannot vouch for this {what}; {fix}")
    listed = read_sums(sums)
    for name in required:
        if name not in listed:
            raise RequantError(f"{sums}: does not list {name}; cannot vouch for this {what}")
    for name, expected in listed.items():
        path = root / name
        if not path.is_file():
            raise RequantError(f"{path}: listed in {SUMS} but missing from the {what}; {fix}")
        digest = sha256_file(path)
        if digest != expected:
            raise RequantError(f"{path}: sha256 {digest[:16]}... does not match {SUMS} ({expected[:16]}...): "
                               f"the {what} is corrupted or modified; {fix}")
