"""A terminal a person reads: one live line per phase of a long run, everything else in a log file.

Code that runs a phase says so with :func:`phase` (converting a variant's layer jobs, the smoke test, GSM8K on one
variant seed by seed, ...). Nothing is shown unless a caller installed a display with :func:`quiet_terminal`, which
``make flow-run`` and ``requant convert`` do: from then on the process's own stdout and stderr (file descriptors 1
and 2, which child processes such as Ray's workers, lm-eval and the servers inherit) go to a log file, and the
terminal shows only the phase lines, the log's path and, on failure, the error. Without it (tests, library use,
Prefect workers) phases cost nothing and the usual logs and progress bars stay where they were.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from requant import settings

_display: _Terminal | None = None


class Phase:
    """A running phase: :meth:`advance` its count, :meth:`note` a short status; :meth:`result` the text its finished
    line ends with (default: the count and the time it took)."""

    def __init__(self, name: str, total: int | None, unit: str) -> None:
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.status = ""
        self.outcome: str | None = None
        self.started = time.monotonic()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.status = note
        _show(self)

    def note(self, text: str) -> None:
        self.status = text
        _show(self)

    def result(self, text: str) -> None:
        self.outcome = text

    def line(self) -> str:
        count = f" {self.done}/{self.total} {self.unit}" if self.total else ""
        status = f"  {self.status}" if self.status else ""
        return f"{self.name}:{count}{status} ({time.monotonic() - self.started:.0f} s)"


@contextlib.contextmanager
def phase(name: str, total: int | None = None, unit: str = "") -> Iterator[Phase]:
    """One phase of a run, shown as one live line while it runs and one finished line (or the failure) after."""
    p = Phase(name, total, unit)
    _show(p)
    try:
        yield p
    except BaseException as exc:
        if _display is not None:
            _display.finish(p, ok=False, text=type(exc).__name__)
        raise
    if _display is not None:
        _display.finish(p, ok=True, text=p.outcome)


def say(text: str) -> None:
    """A line for the person at the terminal (where the log is, a summary): shown when a display is installed,
    else printed as usual."""
    if _display is not None:
        _display.write(text)
    else:
        print(text)


def _show(p: Phase) -> None:
    if _display is not None:
        _display.live(p)


class _Terminal:
    """Writes to the terminal's own file descriptor; a live line is redrawn in place on a TTY (at most a few times
    a second) and left out elsewhere, where only finished lines are written."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.last = 0.0
        self.drawn = False

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False

    def live(self, p: Phase) -> None:
        if not self.tty:
            return
        with self.lock:
            now = time.monotonic()
            if now - self.last < 0.2 and p.done != p.total:
                return
            self.last = now
            self._clear()
            self.stream.write("  " + p.line()[: _width() - 3])
            self.drawn = True
            self.stream.flush()

    def finish(self, p: Phase, ok: bool, text: str | None) -> None:
        with self.lock:
            self._clear()
            elapsed = f"{time.monotonic() - p.started:.0f} s"
            detail = text or (f"{p.done}/{p.total} {p.unit}" if p.total else "")
            if ok:
                self.stream.write(f"  {p.name}: {detail + ', ' if detail else ''}{elapsed}\n")
            else:
                self.stream.write(f"FAILED {p.name} after {elapsed}{': ' + detail if detail else ''}\n")
            self.stream.flush()

    def write(self, text: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(text.rstrip("\n") + "\n")
            self.stream.flush()


def _width() -> int:
    try:
        return os.get_terminal_size(sys.__stderr__.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 120


@contextlib.contextmanager
def quiet_terminal(log_file: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr (and what its children inherit) to ``log_file`` and show phases on the
    terminal. The log's path is shown first; on an exception its one-line message and the log's path are shown
    again, and the exception propagates. The descriptors are restored on the way out."""
    global _display
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)  # progress goes where tqdm's goes
    with open(log_file, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _display = _Terminal(terminal)
        _display.write(f"log (third-party output, warnings, progress bars): {log_file}")
        try:
            yield log_file
        except BaseException as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _display.write(f"error: {message}\nfull log: {log_file}")
            raise
        finally:
            _display = None
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            terminal.close()


def default_log_dir() -> Path:
    """Where a CLI run's log goes: $REQUANT_LOG_DIR, else $XDG_STATE_HOME/requant/logs (~/.local/state/...)."""
    configured = settings.LOG_DIR.get()
    if configured is not None:
        return configured
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "requant" / "logs"


def log_name(what: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{what}.log"
