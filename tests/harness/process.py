"""What the server harnesses share: server processes that never outlive the test run, free loopback
ports, log tails, and waiting until a server answers.

A server a harness starts must not outlive the process that started it. Three things see to it:
``close()`` (called by the test's ``with`` block or fixture), an :class:`ExitHook` that calls
``close()`` at interpreter exit if the caller forgot, and a :class:`Watchdog` process that cleans
up if the caller is killed outright (SIGKILL), because neither ``finally`` blocks nor ``atexit``
run then.

:class:`OwnedProcess` puts them together for a server that is one child process (tansu,
nats-server, redis-server): started on a free loopback port, stopped, started again on the same
port, paused (SIGSTOP) and resumed; :func:`start_owned` starts one, trying other ports while the
one picked turns out to be taken. :class:`Server` is what such a harness hands to tests: a shared
server named by its URL, or one of ours. PostgreSQL (pg_ctl daemonizes the postmaster) and
RabbitMQ (a process group, and epmd) use the watchdog, the exit hook, the port picking and the
log tail directly.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

HOST = "127.0.0.1"
_STOP_GRACE_S = 10.0
_START_ATTEMPTS = 5

# Runs in its own session so a Ctrl-C aimed at the test run does not kill it before it has
# cleaned up. It blocks reading stdin; the only writer is the process that armed it, so EOF means
# that process is gone. "disarm" means the server was already cleaned up by us.
_WATCHDOG_SOURCE = """\
import json, os, shutil, signal, subprocess, sys
if "disarm" in sys.stdin.read():
    sys.exit(0)
spec = json.loads(sys.argv[1])
if spec["pid"]:
    try:
        (os.killpg if spec["group"] else os.kill)(spec["pid"], signal.SIGKILL)
    except OSError:
        pass
for command in spec["commands"]:
    try:
        subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
    except Exception:
        pass
if spec["remove"]:
    shutil.rmtree(spec["remove"], ignore_errors=True)
"""


class StartError(RuntimeError):
    """The server did not come up; ``address_in_use`` tells whether another port may help."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


class Closable(Protocol):
    def close(self) -> None: ...


class ClosesOnExit:
    """A context manager whose ``with`` block ends with :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ExitHook:
    """Calls ``owner.close()`` at interpreter exit while armed, and only in the process that armed
    it: a child created by os.fork() inherits the hook, and its exit must not stop the server."""

    def __init__(self, owner: Closable) -> None:
        self._owner = owner
        self._armed_by = os.getpid()

    def arm(self) -> None:
        self._armed_by = os.getpid()
        atexit.register(self._run)

    def disarm(self) -> None:
        atexit.unregister(self._run)

    def _run(self) -> None:
        if os.getpid() != self._armed_by:
            return
        try:
            self._owner.close()
        except Exception as exc:
            # Interpreter shutdown: nobody can catch this; the watchdog is the fallback.
            print(f"outbox-relay test harness: could not stop {self._owner!r}: {exc}", file=sys.stderr)


class Watchdog:
    """A small process of its own that cleans up after a server once the process that armed it is
    gone (killed with SIGKILL included), unless disarmed first."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def arm(
        self,
        *,
        pid: int | None = None,
        group: bool = False,
        commands: Sequence[Sequence[str]] = (),
        remove: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Replace the armed watchdog, if any, by one that will SIGKILL ``pid`` (its process group
        with ``group``), then run ``commands`` (60 s each at most), then delete ``remove``."""
        self.disarm()
        spec = {
            "pid": pid,
            "group": group,
            "commands": [list(command) for command in commands],
            "remove": str(remove) if remove is not None else "",
        }
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_SOURCE, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=env,
            start_new_session=True,
        )

    def disarm(self) -> None:
        """Tell the watchdog that all is cleaned up, and wait for it to exit. A no-op if not armed."""
        watchdog, self._process = self._process, None
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


class OwnedProcess:
    """One server process: ``command(port, root)`` builds its argv, ``ready(port)`` says it answers.

    ``close()`` kills it and deletes ``root``; an exit hook and a watchdog do the same if the
    caller forgets or is killed."""

    def __init__(
        self,
        name: str,
        command: Callable[[int, Path], list[str]],
        ready: Callable[[int], bool],
        root: Path,
        port: int,
        *,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.port = port
        self.root = root
        self.log_path = root / f"{name}.log"
        self._command = command
        self._ready = ready
        self._env = env
        self._ready_timeout = ready_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog = Watchdog()
        self._closed = False
        self._exit_hook = ExitHook(self)
        self._exit_hook.arm()

    def __repr__(self) -> str:
        return f"<OwnedProcess {self.name} on port {self.port}>"

    @property
    def pid(self) -> int | None:
        """The process id while it runs (or is paused), else None."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def spawn(self) -> None:
        """Start the process and return once ``ready`` is true; StartError (with the log) if not.
        A no-op while it runs."""
        if self._closed:
            raise RuntimeError(f"{self.name}: closed")
        if self.pid is not None:
            return
        with self.log_path.open("ab") as log:
            log.write(f"--- harness: starting on port {self.port} ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(self.port, self.root),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.root),
                env=self._env,
            )
        self._watchdog.arm(pid=self._process.pid, remove=self.root)
        try:
            wait_until_ready(
                self._process, self.name, lambda: self._ready(self.port), self._ready_timeout, self.log_tail
            )
        except BaseException:
            self.stop(kill=True)
            raise

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered, like a hung server."""
        os.kill(self._running("pause"), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: it answers the requests that piled up, then carries on."""
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
        self._watchdog.disarm()

    def close(self) -> None:
        """Kill the process and delete its directory. Idempotent."""
        if self._closed:
            return
        self.stop(kill=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self._closed = True
        self._exit_hook.disarm()

    def log_tail(self, max_chars: int = 4000) -> str:
        return log_tail(self.log_path, max_chars)

    def _running(self, action: str) -> int:
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"cannot {action} {self.name}: it is not running")
        return pid


def start_owned(
    name: str,
    command: Callable[[int, Path], list[str]],
    ready: Callable[[int], bool],
    *,
    tmp_root: str | None = None,
    env: dict[str, str] | None = None,
) -> OwnedProcess:
    """Start a server in a new directory ``relay-NAME-*`` under ``tmp_root`` (default: the system
    temp directory) on a free loopback port. The port is free when picked, but another process may
    take it before the server binds it: then another port is tried, a few times."""
    last: StartError | None = None
    for _attempt in range(_START_ATTEMPTS):
        root = Path(tempfile.mkdtemp(prefix=f"relay-{name}-", dir=tmp_root)).resolve()
        process = OwnedProcess(name, command, ready, root, pick_port(), env=env)
        try:
            process.spawn()
        except StartError as exc:
            process.close()
            last = exc
            if exc.address_in_use:
                continue
            raise
        except BaseException:
            process.close()
            raise
        return process
    assert last is not None
    raise last


class Server(ClosesOnExit):
    """A server for tests: ``url`` for clients; ``owned`` True when this object started it (only
    then do :meth:`pause`, :meth:`resume`, :meth:`stop` and :meth:`start` work). Use it as a
    context manager, or call :meth:`close`."""

    #: How error messages name a shared server, and how a test gets one it may stop instead.
    shared_kind = "a shared server"
    private_hint = ""

    def __init__(self, url: str, *, owned: bool, process: OwnedProcess | None = None) -> None:
        self.url = url
        self.owned = owned
        self._process = process

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {'private' if self.owned else 'shared'} {self.url}>"

    @property
    def pid(self) -> int | None:
        """The server's process id while an owned server runs (or is paused), else None."""
        return self._process.pid if self._process is not None else None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing is answered, like a hung server."""
        self._owned("pause").pause()

    def resume(self) -> None:
        """SIGCONT a paused server; it answers the requests that piled up, then carries on."""
        self._owned("resume").resume()

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill``) and return once the process is gone.
        A no-op when stopped."""
        self._owned("stop").stop(kill=kill)

    def start(self) -> None:
        """Start the server again on the same port and return once it answers. A no-op while it
        runs; StartError (with the tail of its log) if it does not come up."""
        self._owned("start").spawn()

    def close(self) -> None:
        """Kill an owned server and delete its directory; a no-op for a shared one. Idempotent."""
        if self._process is not None:
            self._process.close()

    def _owned(self, action: str) -> OwnedProcess:
        if self._process is None:
            raise RuntimeError(f"cannot {action} {self.shared_kind} ({self.url}); {self.private_hint}")
        return self._process


def wait_until_ready(
    process: subprocess.Popen[bytes],
    name: str,
    ready: Callable[[], bool],
    timeout: float,
    log_tail: Callable[[], str],
    interval: float = 0.02,
) -> None:
    """Return once ``ready()`` is true. StartError, with the tail of the log, when the process
    exits first (``address_in_use`` when its log says so) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            tail = log_tail()
            raise StartError(
                f"{name} exited with status {process.returncode} before answering\n{tail}",
                address_in_use=address_in_use(tail),
            )
        if time.monotonic() > deadline:
            raise StartError(f"{name} did not answer within {timeout:g}s\n{log_tail()}")
        time.sleep(interval)


def address_in_use(log_text: str) -> bool:
    """Whether a server's log says its port was taken (Linux, Rust and PostgreSQL wordings)."""
    text = log_text.lower()
    return "address already in use" in text or "addrinuse" in text or "could not bind" in text


def log_tail(path: Path | None, max_chars: int = 4000) -> str:
    """The end of a server's log, headed by its path, for error messages."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return f"--- tail of {path} ---\n{text[-max_chars:]}"


def pick_port() -> int:
    """A free loopback port, preferably outside the kernel's ephemeral range (an outgoing
    connection could take an ephemeral port while the server is down for a restart)."""
    return pick_ports(1)[0]


def pick_ports(count: int) -> tuple[int, ...]:
    """``count`` distinct free loopback ports, as :func:`pick_port` picks them."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen: list[int] = []
    while len(chosen) < count:
        chosen.append(_pick_one(low, avoid=chosen))
    return tuple(chosen)


def _pick_one(ephemeral_low: int, avoid: list[int]) -> int:
    if ephemeral_low > 16000:
        for _ in range(50):
            port = random.randint(15000, ephemeral_low - 1)
            if port not in avoid and port_is_free(port):
                return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def exchange(host: str, port: int, send: bytes, timeout: float = 1.0) -> bytes:
    """Connect, send ``send`` (may be empty), and return the first bytes answered ("" if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            return sock.recv(4096)
    except OSError:
        return b""
