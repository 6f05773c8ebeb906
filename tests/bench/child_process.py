"""Running the relay as a child process of a benchmark, and measuring its own peak memory.

`wait4`'s `ru_maxrss` cannot serve: Linux carries the high-water mark of the address space a
child had before `exec` over into the new program's, and before `exec` that is a copy of the
benchmark's own (which may hold hundreds of thousands of prepared messages). `VmHWM` in
/proc/<pid>/status is the high-water mark of the relay's own address space; it only grows, so
reading it until the process exits gives its peak.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_WATCH_INTERVAL_S = 0.02
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RelayCommand:
    """How a benchmark starts the relay: the command line before `run -c CONFIG --drain`, and the
    environment and working directory of the process (None: this process's own)."""

    argv: tuple[str, ...] = (sys.executable, "-m", "outbox_relay")
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


#: `python -m relay` from this process's working directory, as the benchmarks start the relay.
RELAY_MODULE = RelayCommand()


@dataclass(frozen=True)
class RelayRun:
    """What a benchmark learns from watching one relay process from the outside."""

    code: int
    peak_mb: float
    seconds: float
    #: (wall clock as time.time(), CPU seconds the process had used), sampled while it ran.
    cpu_samples: tuple[tuple[float, float], ...]

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds (user + system) the relay used between two wall-clock instants, interpolated
        between samples: less disturbed than the elapsed time by other work on a busy machine."""
        return self._cpu_at(end) - self._cpu_at(start)

    def _cpu_at(self, when: float) -> float:
        samples = self.cpu_samples
        if not samples:
            return 0.0
        after = bisect.bisect_left([wall for wall, _ in samples], when)
        if after == 0:
            return samples[0][1]
        if after == len(samples):
            return samples[-1][1]
        (wall0, cpu0), (wall1, cpu1) = samples[after - 1], samples[after]
        return cpu0 + (cpu1 - cpu0) * (when - wall0) / (wall1 - wall0)


def run_relay_watching_memory(
    config: Path, stderr: IO[str] | None = None, command: RelayCommand = RELAY_MODULE
) -> RelayRun:
    """`outbox-relay run -c config --drain` as its own process, its peak RSS and CPU time sampled."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*command.argv, "run", "-c", str(config), "--drain"],
        stderr=stderr,
        env=command.env,
        cwd=command.cwd,
    )
    peak_kb = 0
    cpu_samples: list[tuple[float, float]] = []
    proc_dir = Path(f"/proc/{proc.pid}")
    while proc.poll() is None:
        try:
            peak_kb = max(peak_kb, _high_water_kb((proc_dir / "status").read_text()))
            cpu_samples.append((time.time(), _cpu_seconds((proc_dir / "stat").read_text())))
        except (OSError, ValueError):  # the process is exiting
            pass
        time.sleep(_WATCH_INTERVAL_S)
    return RelayRun(proc.returncode, peak_kb / 1024, time.perf_counter() - started, tuple(cpu_samples))


def _high_water_kb(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise ValueError("no VmHWM line")


def _cpu_seconds(stat: str) -> float:
    """utime + stime of /proc/<pid>/stat, in seconds. The fields are counted after the command
    name, which is in parentheses and may itself hold spaces."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
