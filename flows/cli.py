"""The ``requant`` console script: the library's command line (requant.cli), with ``convert`` without
``--local`` running the requantize flow. It lives here so that the library never imports orchestration."""

from __future__ import annotations

import sys
from typing import Any

from requant import cli


def convert_with_flow(**options: Any) -> dict[str, Any]:
    """``requant convert SRC DST`` on Prefect + Ray: the requantize flow without its downstream evaluation."""
    from flows.requantize import requantize, start_ephemeral_server  # Prefect and Ray load only for this command

    start_ephemeral_server()
    return requantize(**options, evaluate=False)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, convert_flow=convert_with_flow)


if __name__ == "__main__":
    sys.exit(main())
