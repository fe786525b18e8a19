"""requant.progress: under quiet_terminal the terminal shows the phases and the log's path, and everything the
process and its children write goes to the log, errors included; without it phases print nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import subprocess, sys, warnings
    from pathlib import Path
    from requant.errors import RequantError
    from requant.progress import phase, quiet_terminal, say

    log = Path(sys.argv[1])
    fail = sys.argv[2] == "fail"
    with quiet_terminal(log):
        print("python-stdout-noise")
        print("python-stderr-noise", file=sys.stderr)
        warnings.warn("a third-party warning")
        subprocess.run(["sh", "-c", "echo child-stdout-noise; echo child-stderr-noise >&2"], check=True)
        with phase("convert demo", total=3, unit="layer jobs") as shown:
            for _ in range(3):
                shown.advance()
        with phase("smoke test demo") as shown:
            shown.result("passed (top-1 1.00)")
        if fail:
            with phase("GSM8K demo", total=3, unit="seeds") as shown:
                shown.advance()
                raise RequantError("gate failed for s3://b/x: accuracy dropped\\nsecond line")
        say("summary line")
    print("after-the-run")
""")


def _run(tmp_path, mode):
    log = tmp_path / "logs" / "run.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode], capture_output=True, text=True, timeout=60)
    return proc, log.read_text()


def test_the_terminal_shows_phases_and_the_log_takes_the_rest(tmp_path):
    proc, log = _run(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stderr.splitlines()
    assert terminal[0] == f"log (third-party output, warnings, progress bars): {tmp_path / 'logs' / 'run.log'}"
    assert terminal[1].startswith("  convert demo: 3/3 layer jobs, ") and terminal[1].endswith(" s")
    assert terminal[2].startswith("  smoke test demo: passed (top-1 1.00), ")
    assert terminal[3] == "summary line"
    assert len(terminal) == 4
    assert proc.stdout == "after-the-run\n"        # the descriptors are restored afterwards
    for noise in ("python-stdout-noise", "python-stderr-noise", "a third-party warning", "child-stdout-noise",
                  "child-stderr-noise"):
        assert noise in log and noise not in proc.stderr + proc.stdout


def test_an_error_reaches_the_terminal_in_one_line_with_the_log(tmp_path):
    proc, _ = _run(tmp_path, "fail")
    assert proc.returncode != 0
    terminal = proc.stderr.splitlines()
    failed = [line for line in terminal if line.startswith("FAILED GSM8K demo after ")]
    assert failed and failed[0].endswith(": RequantError")
    error = terminal.index("error: gate failed for s3://b/x: accuracy dropped")
    assert terminal[error + 1] == f"full log: {tmp_path / 'logs' / 'run.log'}"
    assert "second line" not in terminal[error]
    # the traceback comes after the descriptors are restored, so Python's own report is on the terminal too
    assert "Traceback" in proc.stderr and "summary line" not in proc.stderr


def test_without_a_display_phases_print_nothing(capfd):
    from requant.progress import phase

    with phase("quiet", total=2, unit="x") as shown:
        shown.advance()
        shown.advance()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
