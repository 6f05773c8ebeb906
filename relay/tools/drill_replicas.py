"""The relay processes a drill runs: each a child process on its own copy of the config, behind
its own cut-off proxy when the drill cuts relays off from the database."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from outbox_relay.config import OutboxConfig, RelayConfig
from outbox_relay.tools.drill_faults import same_database, through_proxy
from outbox_relay.tools.drill_proxy import CutoffProxy


class Replicas:
    """Relay child processes, one per slot, each on its own copy of the config (HTTP port off)
    and, for the cut faults, behind its own proxy to the database. A slot whose relay died is
    filled again with a new one on the same config and proxy."""

    def __init__(self, configs: list[Path], logs: Path, proxies: list[CutoffProxy | None]) -> None:
        self._configs, self._logs, self._proxies = configs, logs, proxies
        self._slots: list[subprocess.Popen[bytes] | None] = [None] * len(configs)
        self._log_of: dict[int, Path] = {}
        self.kills = 0
        #: Relays that exited without being killed by the drill (a note each).
        self.exits: list[str] = []

    def _spawn(self, slot: int) -> None:
        path = self._logs / f"relay-{len(self._log_of)}.log"
        with path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox_relay", "run", "-c", str(self._configs[slot])],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the drill reaches the drill, not the relays
            )
        self._log_of[proc.pid] = path
        self._slots[slot] = proc

    def fill(self) -> None:
        for slot, proc in enumerate(self._slots):
            if proc is not None and proc.poll() is not None:
                self.exits.append(
                    f"relay pid {proc.pid} exited by itself ({proc.returncode}): {self._last_line(proc.pid)}"
                )
            if proc is None or proc.poll() is not None:
                self._spawn(slot)

    def _last_line(self, pid: int) -> str:
        lines = self._log_of[pid].read_bytes().decode(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else "(no log)"

    def alive(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        return [(slot, p) for slot, p in enumerate(self._slots) if p is not None and p.poll() is None]

    def ever_started(self, pid: int) -> bool:
        return pid in self._log_of

    def proxy(self, slot: int) -> CutoffProxy | None:
        return self._proxies[slot]

    def kill_one(self) -> None:
        alive = self.alive()
        if alive:
            slot, victim = random.choice(alive)
            victim.kill()  # (a frozen one too)
            victim.wait()
            self._slots[slot] = None
            self.kills += 1
        self.fill()

    def stop(self) -> None:
        for _, proc in self.alive():
            proc.send_signal(signal.SIGCONT)  # (a frozen relay handles SIGTERM once it runs)
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for stopping in self._slots:
            if stopping is None:
                continue
            try:
                stopping.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                stopping.kill()
                stopping.wait()


def _proxied_dsns(outbox: OutboxConfig, box: dict[str, Any], proxy: CutoffProxy) -> None:
    """Point the source's DSN of `box` (the outbox's config as data), and the dead-letter DSN
    when it names the same database, at `proxy`."""
    dsn = box["source"]["dsn"]
    box["source"]["dsn"] = through_proxy(dsn, proxy.port)
    dead_letters = outbox.dead_letter.dsn
    if dead_letters is not None and same_database(dead_letters, dsn):
        box["dead_letter"]["dsn"] = through_proxy(dead_letters, proxy.port)


def child_config(
    config: RelayConfig, outbox: OutboxConfig, directory: Path, slot: int, proxy: CutoffProxy | None
) -> Path:
    data = config.model_dump(mode="json")
    box = outbox.model_dump(mode="json")
    if proxy is not None:
        _proxied_dsns(outbox, box, proxy)
    data["outboxes"] = [box]
    data["http"] = {"port": 0}
    data["log"] = {"format": "json", "level": "info"}
    path = directory / f"relay-{slot}.yaml"
    path.touch(mode=0o600)  # it holds the DSN
    path.write_text(yaml.safe_dump(data))
    return path
