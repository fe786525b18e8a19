"""The ``requant`` console script: the library's command line (requant.cli), with ``convert`` without
``--local`` running the requantize flow. It lives here so that the library never imports orchestration."""

from __future__ import annotations

import contextlib
import sys

from requant import cli, settings
from requant.progress import default_log_dir, log_name, phase, quiet_terminal
from requant.run import ConvertOptions, ConvertSummary


def convert_with_flow(source: str, dest: str, recipe: str, options: ConvertOptions) -> ConvertSummary:
    """``requant convert SRC DST`` on Prefect + Ray: the requantize flow without its downstream evaluation. On a
    terminal, one line per phase; Prefect's and Ray's output goes to a log file (requant.progress.default_log_dir)
    whose path is printed. Piped or redirected, everything is written as it comes."""
    from requant.flows.parameters import Cluster, Conversion, Evaluation
    from requant.flows.requantize import requantize  # only for this command
    from requant.flows.runtime import start_ephemeral_server, stop_ephemeral_server

    quiet = sys.stderr.isatty() and not settings.VERBOSE.get()
    with quiet_terminal(default_log_dir() / log_name("convert")) if quiet else contextlib.nullcontext():
        with phase("start Prefect (ephemeral server)"):
            start_ephemeral_server()
        try:
            conversion = Conversion(revision=options.revision, upstream_id=options.upstream_id,
                                    quark_version=options.quark_version, fused_excludes=options.fused_excludes,
                                    shared_global_scale=options.shared_global_scale,
                                    overwrite=options.overwrite, unverified=options.unverified)
            return requantize(upstream=source, output=dest, recipe=recipe, conversion=conversion,
                              cluster=Cluster(device=options.device, threads=options.threads or 1,
                                              expert_groups=options.expert_groups),
                              evaluation=Evaluation(enabled=False), progress=not quiet and options.progress).conversion
        finally:
            stop_ephemeral_server()


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, convert_flow=convert_with_flow)


if __name__ == "__main__":
    sys.exit(main())
