"""A server process owned by a test harness: started on a free loopback port, stopped, started
again on the same port, paused (SIGSTOP) and resumed, and never outliving the process that
started it.

``close()`` kills it, an ``atexit`` hook does the same if the caller forgot, and a small watchdog
process does it if the caller is killed outright (SIGKILL), because neither ``finally`` blocks nor
``atexit`` run then. Used by the NATS and Redis harnesses; the Kafka harness has its own copy.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HOST = "127.0.0.1"
_STOP_GRACE_S = 10.0

# Runs in its own session so a Ctrl-C aimed at the test run does not kill it before it has
# cleaned up. It blocks reading stdin; the only writer is the process that started the server,
# so EOF means that process is gone. "disarm" means the server was already stopped by us.
_WATCHDOG_SOURCE = """\
import os, shutil, signal, sys
if "disarm" in sys.stdin.read():
    sys.exit(0)
try:
    os.kill(int(sys.argv[1]), signal.SIGKILL)
except OSError:
    pass
if sys.argv[2]:
    shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


class StartError(RuntimeError):
    """The server did not come up; ``address_in_use`` tells whether another port may help."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


class OwnedProcess:
    """One server process: ``command(port)`` builds its argv, ``ready(port)`` says it answers."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], list[str]],
        ready: Callable[[int], bool],
        root: Path,
        port: int,
        *,
        ready_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.port = port
        self.root = root
        self.log_path = root / f"{name}.log"
        self._command = command
        self._ready = ready
        self._ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._creator_pid = os.getpid()
        atexit.register(self._at_exit)

    @property
    def pid(self) -> int | None:
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def spawn(self) -> None:
        """Start the process and return once ``ready`` is true; StartError (with the log) if not."""
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")
        if self.pid is not None:
            return
        with self.log_path.open("ab") as log:
            log.write(f"--- harness: starting on port {self.port} ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(self.port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
            )
        self._start_watchdog(self._process.pid)
        deadline = time.monotonic() + self._ready_timeout
        try:
            while not self._ready(self.port):
                if self._process.poll() is not None:
                    tail = self.log_tail()
                    raise StartError(
                        f"{self.name} exited with status {self._process.returncode} before answering\n{tail}",
                        address_in_use="address already in use" in tail.lower()
                        or "addrinuse" in tail.lower(),
                    )
                if time.monotonic() > deadline:
                    raise StartError(
                        f"{self.name} did not answer within {self._ready_timeout:g}s\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop(kill=True)
            raise

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered, like a hung server."""
        os.kill(self._running("pause"), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._running("resume"), signal.SIGCONT)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill``) and wait for it. A no-op when stopped."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)  # a stopped process queues SIGTERM otherwise
            if kill:
                process.kill()
            else:
                process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_GRACE_S)
        self._disarm_watchdog()

    def close(self) -> None:
        """Kill the process and delete its directory. Idempotent."""
        if self._closed:
            return
        self.stop(kill=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self._closed = True
        atexit.unregister(self._at_exit)

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return f"--- tail of {self.log_path} ---\n{text[-max_chars:]}"

    def _running(self, action: str) -> int:
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"cannot {action} {self.name}: it is not running")
        return pid

    def _start_watchdog(self, pid: int) -> None:
        self._disarm_watchdog()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_SOURCE, str(pid), str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )

    def _disarm_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"disarm\n")
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(timeout=10)

    def _at_exit(self) -> None:
        if os.getpid() != self._creator_pid:
            return
        try:
            self.close()
        except Exception as exc:
            print(f"outbox-relay test harness: could not stop {self.name}: {exc}", file=sys.stderr)


def pick_port() -> int:
    """A free loopback port, preferably outside the kernel's ephemeral range (an outgoing
    connection could take an ephemeral port while the server is down for a restart)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 16000:
        for _ in range(50):
            port = random.randint(15000, low - 1)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def exchange(host: str, port: int, send: bytes, timeout: float = 1.0) -> bytes:
    """Connect, send ``send`` (may be empty), and return the first bytes answered ("" if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(4096)
    except OSError:
        return b""
