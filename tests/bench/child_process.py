"""Running the relay as a child process of a benchmark, and measuring its own peak memory.

`wait4`'s `ru_maxrss` cannot serve: Linux carries the high-water mark of the address space a
child had before `exec` over into the new program's, and before `exec` that is a copy of the
benchmark's own (which may hold hundreds of thousands of prepared messages). `VmHWM` in
/proc/<pid>/status is the high-water mark of the relay's own address space; it only grows, so
reading it until the process exits gives its peak.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_WATCH_INTERVAL_S = 0.02


@dataclass(frozen=True)
class RelayCommand:
    """How a benchmark starts the relay: the command line before `run -c CONFIG --drain`, and the
    environment and working directory of the process (None: this process's own)."""

    argv: tuple[str, ...] = (sys.executable, "-m", "relay")
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


#: `python -m relay` from this process's working directory, as the benchmarks start the relay.
RELAY_MODULE = RelayCommand()


def run_relay_watching_memory(
    config: Path, stderr: IO[str] | None = None, command: RelayCommand = RELAY_MODULE
) -> tuple[int, float, float]:
    """`outbox-relay run -c config --drain` as its own process: (exit code, peak RSS in MB, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*command.argv, "run", "-c", str(config), "--drain"],
        stderr=stderr,
        env=command.env,
        cwd=command.cwd,
    )
    peak_kb = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            peak_kb = max(peak_kb, _high_water_kb(status.read_text()))
        except (OSError, ValueError):  # the process is exiting
            pass
        time.sleep(_WATCH_INTERVAL_S)
    return proc.returncode, peak_kb / 1024, time.perf_counter() - started


def _high_water_kb(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise ValueError("no VmHWM line")
