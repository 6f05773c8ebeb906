"""A real RabbitMQ broker for tests and benchmarks.

``start_rabbitmq()`` returns a :class:`RabbitBroker` that is one of

* an **external** broker named by ``RELAY_TEST_AMQP_URL`` (``owned`` False, never stopped by us:
  :meth:`RabbitBroker.stop` and :meth:`RabbitBroker.start` raise :class:`BrokerControlUnavailable`);
* the **system node** answering on ``127.0.0.1:5672`` with guest/guest (``owned`` False), which
  other programs of this machine use too: tests publish to it and consume from it with exchanges
  and queues of their own, and never stop, restart or reconfigure it (no ``stop_app``, no plugins,
  no users): :meth:`RabbitBroker.stop`, :meth:`RabbitBroker.enable_plugin` and the like raise
  :class:`BrokerControlUnavailable`, and a test that needs them uses ``start_rabbitmq(private=True)``;
* a **private node** (``owned`` True) started from Debian's ``rabbitmq-server`` package with its own
  node name (``relaytest-<random>@localhost``), AMQP port, distribution port, epmd port, Erlang
  cookie, config, data and log directories, all under a fresh temporary directory; nothing of the
  system node's configuration (``/etc/rabbitmq``) is read. ``stop`` is ``rabbitmqctl stop`` (the
  whole node), ``start`` boots it again on the same ports with the same data. The consistent-hash
  exchange plugin is enabled from the first boot.

Facts seen on Debian 12 (RabbitMQ 3.10.8, Erlang 25): a private node boots in ~4 s;
``rabbitmqctl await_startup`` fails at once (status 69) until the node has registered with epmd,
so it is retried; the plugin ``rabbitmq_consistent_hash_exchange`` ships with the package but is
not enabled on the system node.

An owned node never outlives the process that started it: ``close()`` stops it, an exit hook
does the same if the caller forgot, and a watchdog process kills it if the caller is killed
outright (see ``tests/harness/process.py``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.harness.process import (
    HOST,
    ClosesOnExit,
    ExitHook,
    Watchdog,
    log_tail,
    pick_ports,
    port_accepts,
    wait_until_ready,
)
from tests.harness.server_choice import Mode, mode_from

__all__ = [
    "AMQP_URL_ENV_VAR",
    "CONSISTENT_HASH_PLUGIN",
    "PRIVATE_ENV_VAR",
    "SYSTEM_URL",
    "BrokerControlUnavailable",
    "RabbitBroker",
    "consistent_hash_available",
    "declare_queue",
    "delete",
    "drain_queue",
    "queue_depth",
    "start_rabbitmq",
]

AMQP_URL_ENV_VAR = "RELAY_TEST_AMQP_URL"
PRIVATE_ENV_VAR = "RELAY_TEST_RABBITMQ_PRIVATE"
"""Set to 1 to boot a private node even where the system node would do."""
SYSTEM_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
CONSISTENT_HASH_PLUGIN = "rabbitmq_consistent_hash_exchange"

_LIB_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's real scripts; /usr/sbin holds wrappers that `su`
_BOOT_TIMEOUT_S = 90.0
_CTL_TIMEOUT_S = 60.0
_AMQP_READY_TIMEOUT_S = 30.0


class BrokerControlUnavailable(RuntimeError):
    """This broker cannot be stopped or started from here (tests needing that should skip)."""


class RabbitBroker(ClosesOnExit):
    """A RabbitMQ broker for tests: an external one, the system node, or a private node.

    Attributes:
        url: AMQP URL with credentials, for clients.
        owned: True when this object started the node (a private node).
        node: Erlang node name when known (system or private node), else None.
        root: temporary directory of a private node (data, logs, cookie), else None.

    Not thread-safe; use it as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        *,
        owned: bool,
        node: str | None = None,
        root: Path | None = None,
        ports: tuple[int, int, int] | None = None,
    ) -> None:
        self.url = url
        self.owned = owned
        self.node = node
        self.root = root
        self.log_path = root / "server.out" if root is not None else None
        self._ports = ports  # (amqp, distribution, epmd) of a private node
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog = Watchdog()
        self._closed = False
        self._exit_hook = ExitHook(self)
        self._exit_hook.arm()

    def __repr__(self) -> str:
        kind = "private node" if self.owned else ("system node" if self.url == SYSTEM_URL else "external")
        return f"<RabbitBroker {kind} {_redact(self.url)}>"

    # -- control -------------------------------------------------------------------------------

    @property
    def controllable(self) -> bool:
        """True when :meth:`stop`/:meth:`start`/:meth:`enable_plugin` work on this broker."""
        return self._why_not_controllable() == ""

    def stop(self) -> None:
        """Take the whole private node down and return once it no longer accepts AMQP connections.
        Raises BrokerControlUnavailable for a broker this run did not start."""
        self._require_control("stop")
        self._stop_node()
        _wait_port_closed(self._amqp_address(), 10.0)

    def start(self) -> None:
        """Bring the node back and return once it accepts AMQP logins. A no-op while it runs."""
        self._require_control("start")
        if self._process is None or self._process.poll() is not None:
            self._spawn()
        wait_for_amqp(self.url, _AMQP_READY_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def enable_plugin(self, name: str) -> None:
        """``rabbitmq-plugins enable NAME`` on this private node. Raises BrokerControlUnavailable."""
        self._require_control("enable a plugin on")
        args = ["enable", name]
        self._run(self._script("rabbitmq-plugins"), *self._node_args(), *args)

    def ensure_consistent_hash(self) -> None:
        """Make the x-consistent-hash exchange type available, enabling its plugin if needed.
        Raises BrokerControlUnavailable when it is missing and cannot be enabled from here."""
        if consistent_hash_available(self.url):
            return
        self.enable_plugin(CONSISTENT_HASH_PLUGIN)
        deadline = time.monotonic() + 10
        while not consistent_hash_available(self.url):
            if time.monotonic() > deadline:
                raise BrokerControlUnavailable(
                    f"{CONSISTENT_HASH_PLUGIN} enabled but the exchange type is missing"
                )
            time.sleep(0.2)

    def add_user(self, user: str, password: str) -> None:
        """Create a user with every permission on vhost "/" (for credential tests)."""
        self._require_control("add a user to")
        self._ctl("add_user", user, password)
        self._ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")

    def set_permissions(self, user: str, configure: str, write: str, read: str) -> None:
        """Set `user`'s permissions on vhost "/" (regular expressions; "^$" grants nothing)."""
        self._require_control("set permissions on")
        self._ctl("set_permissions", "-p", "/", user, configure, write, read)

    def delete_user(self, user: str) -> None:
        self._require_control("delete a user from")
        self._ctl("delete_user", user)

    def url_for(self, user: str, password: str) -> str:
        """This broker's URL with other credentials (the password percent-encoded)."""
        from urllib.parse import quote

        parts = urlsplit(self.url)
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5672}"
        return parts._replace(netloc=netloc).geturl()

    def close(self) -> None:
        """Stop and delete a private node; a no-op for a broker this run did not start. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._exit_hook.disarm()
        if self.owned:
            try:
                self._stop_node()
            finally:
                self._kill_epmd()
                self._watchdog.disarm()
                if self.root is not None:
                    shutil.rmtree(self.root, ignore_errors=True)

    # -- private node --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        assert self.root is not None
        assert self._ports is not None
        assert self.node is not None
        amqp, dist, epmd = self._ports
        root = str(self.root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=root,  # the Erlang cookie lives here, shared by the node and our rabbitmqctl calls
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(amqp),
            RABBITMQ_DIST_PORT=str(dist),
            ERL_EPMD_PORT=str(epmd),
            ERL_EPMD_ADDRESS=HOST,
            RABBITMQ_MNESIA_BASE=f"{root}/mnesia",
            RABBITMQ_LOG_BASE=f"{root}/log",
            # Our own (empty) files, so /etc/rabbitmq (the system node's NODENAME, listeners) is not read.
            RABBITMQ_CONF_ENV_FILE=f"{root}/rabbitmq-env.conf",
            RABBITMQ_CONFIG_FILE=f"{root}/rabbitmq.conf",
            RABBITMQ_ADVANCED_CONFIG_FILE=f"{root}/advanced.config",
            RABBITMQ_ENABLED_PLUGINS_FILE=f"{root}/enabled_plugins",
            RABBITMQ_PID_FILE=f"{root}/rabbitmq.pid",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _spawn(self) -> None:
        assert self.root is not None
        assert self.log_path is not None
        assert self._ports is not None
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self._script("rabbitmq-server")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=self._env(),
                start_new_session=True,  # its own process group, so the watchdog can kill all of it
            )
        epmd = shutil.which("epmd")
        self._watchdog.arm(
            pid=self._process.pid,
            group=True,
            commands=[[epmd, "-port", str(self._ports[2]), "-kill"]] if epmd else [],
            remove=self.root,
        )
        try:
            wait_until_ready(
                self._process,
                f"RabbitMQ node {self.node}",
                self._booted,
                _BOOT_TIMEOUT_S,
                self._log_tail,
                interval=0.3,
            )
            wait_for_amqp(self.url, _AMQP_READY_TIMEOUT_S)
        except BaseException:
            self._kill_node()
            raise

    def _booted(self) -> bool:
        # Fails at once (status 69) until the node has registered with epmd; then it waits.
        done = subprocess.run(
            [self._script("rabbitmqctl"), *self._node_args(), "await_startup", "--timeout", "30"],
            capture_output=True,
            env=self._env(),
            cwd=self.root,
            timeout=_CTL_TIMEOUT_S,
        )
        return done.returncode == 0

    def _stop_node(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        try:
            self._ctl("stop")
            process.wait(timeout=30)
        except (subprocess.SubprocessError, RuntimeError):
            self._kill_node()
        self._process = None

    def _kill_node(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.SubprocessError):
            process.wait(timeout=10)

    def _kill_epmd(self) -> None:
        epmd = shutil.which("epmd")
        if epmd is None or self._ports is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([epmd, "-port", str(self._ports[2]), "-kill"], capture_output=True, timeout=10)

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        paths = [self.log_path, *sorted((self.log_path.parent / "log").glob("*.log"))]
        return "\n".join(log_tail(path) for path in paths)

    # -- commands ------------------------------------------------------------------------------

    def _script(self, name: str) -> str:
        if self.owned:
            # The real script, run as ourselves with our own HOME (cookie); the /usr/sbin wrapper
            # would switch to the rabbitmq user, who cannot read our directory.
            real = _LIB_BIN / name
            if real.is_file():
                return str(real)
        found = shutil.which(name) or (
            str(Path("/usr/sbin") / name) if (Path("/usr/sbin") / name).exists() else None
        )
        if found is None:
            raise BrokerControlUnavailable(f"{name} not found (Debian package rabbitmq-server)")
        return found

    def control_command(self, action: str) -> str:
        """A shell command running `rabbitmqctl ACTION` against this broker (e.g. stop_app,
        start_app), for tools that take a command line such as `outbox-relay drill`."""
        self._require_control(action)
        environment = (
            f"{k}={v}" for k, v in self._env().items() if k.startswith(("RABBITMQ", "HOME", "ERL_"))
        )
        return shlex.join(["env", *environment, self._script("rabbitmqctl"), *self._node_args(), action])

    def _node_args(self) -> list[str]:
        return ["-n", self.node] if self.owned and self.node else []

    def _ctl(self, *args: str) -> None:
        self._run(self._script("rabbitmqctl"), *self._node_args(), *args)

    def _run(self, *command: str) -> None:
        env = self._env() if self.owned else None
        try:
            done = subprocess.run(
                list(command),
                capture_output=True,
                text=True,
                env=env,
                cwd=self.root or "/",
                timeout=_CTL_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise BrokerControlUnavailable(f"{' '.join(command[:3])}: {exc}") from None
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            what = f"{Path(command[0]).name} {' '.join(command[1:])}"
            raise BrokerControlUnavailable(f"{what} failed ({done.returncode}): {output[-1500:]}")

    def _why_not_controllable(self) -> str:
        if self._closed:
            return "this RabbitBroker is closed"
        if self.owned:
            return ""
        return (
            "this run did not start it, and a test never stops, restarts or reconfigures a server it"
            " did not start (use start_rabbitmq(private=True))"
        )

    def _require_control(self, action: str) -> None:
        why = self._why_not_controllable()
        if why:
            raise BrokerControlUnavailable(f"cannot {action} {self!r}: {why}")

    def _amqp_address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or HOST, parts.port or 5672


def start_rabbitmq(*, private: bool = False, tmp_root: str | None = None) -> RabbitBroker:
    """Return a running RabbitMQ broker for tests.

    With ``private`` (a test that stops the broker, enables a plugin or adds users), always a
    private node. Otherwise ``RELAY_TEST_AMQP_URL`` wins when set (RuntimeError if it does not
    accept a login), then the system node on 127.0.0.1:5672 when it accepts guest/guest (unless
    ``RELAY_TEST_RABBITMQ_PRIVATE=1`` or ``RELAY_TEST_SERVERS=containers``), then a container where
    a Docker engine can run the image (tests/harness/containers.py). Else a private node is booted
    under a new directory in ``tmp_root`` (default: the system temp dir); RuntimeError (with the
    install hint) when the rabbitmq-server package is missing.
    """
    external = None if private else os.environ.get(AMQP_URL_ENV_VAR)
    if external:
        try:
            wait_for_amqp(external, 10.0)
        except RuntimeError as exc:
            raise RuntimeError(f"{AMQP_URL_ENV_VAR} is set but {exc}") from None
        return RabbitBroker(external, owned=False)
    prefer_existing = not private and os.environ.get(PRIVATE_ENV_VAR, "") not in ("1", "true", "yes")
    from tests.harness import containers  # (it imports this module)

    # RELAY_TEST_SERVERS=containers asks for a container even where the system node runs.
    prefer_existing = prefer_existing and mode_from(os.environ) is not Mode.CONTAINERS
    if prefer_existing and _amqp_login_works(SYSTEM_URL):
        return RabbitBroker(SYSTEM_URL, owned=False)
    if not private and containers.wanted("rabbitmq"):
        return containers.start_rabbitmq_container()
    if not (_LIB_BIN / "rabbitmq-server").is_file() and shutil.which("rabbitmq-server") is None:
        raise RuntimeError(
            "no RabbitMQ: install the Debian package rabbitmq-server (tests/install-servers.sh), "
            f"or set {AMQP_URL_ENV_VAR}"
        )
    root = Path(tempfile.mkdtemp(prefix="relay-rabbitmq-", dir=tmp_root)).resolve()
    amqp, dist, epmd = pick_ports(3)
    (root / "mnesia").mkdir()
    (root / "log").mkdir()
    (root / "rabbitmq-env.conf").write_text("")
    (root / "rabbitmq.conf").write_text(f"listeners.tcp.1 = {HOST}:{amqp}\n")
    (root / "enabled_plugins").write_text(f"[{CONSISTENT_HASH_PLUGIN}].\n")
    cookie = root / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16).upper())
    cookie.chmod(0o400)
    node = f"relaytest-{uuid.uuid4().hex[:8]}@localhost"
    url = f"amqp://guest:guest@{HOST}:{amqp}/%2F"
    broker = RabbitBroker(url, owned=True, node=node, root=root, ports=(amqp, dist, epmd))
    try:
        broker._spawn()
    except BaseException:
        broker.close()
        raise
    return broker


# -- AMQP helpers (blocking pika; call them from tests, not from the code under test) -----------


def _connect(url: str, timeout: float = 5.0) -> Any:
    import pika

    parameters = pika.URLParameters(url)
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    parameters.connection_attempts = 1
    return pika.BlockingConnection(parameters)


def _amqp_login_works(url: str) -> bool:
    try:
        _connect(url, 3.0).close()
        return True
    except Exception:
        return False


def wait_for_amqp(url: str, timeout: float) -> None:
    """Return once a login on ``url`` succeeds; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _connect(url, min(5.0, max(deadline - time.monotonic(), 0.5))).close()
            return
        except Exception as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{_redact(url)} does not accept a login within {timeout:g}s: {last!r}")


def declare_queue(
    url: str,
    name: str,
    exchange: str,
    binding_key: str,
    arguments: dict[str, Any] | None = None,
    *,
    exchange_type: str | None = None,
) -> None:
    """Declare a durable queue and bind it to ``exchange`` with ``binding_key`` (for an
    x-consistent-hash exchange the binding key is the queue's weight, such as "1"). With
    ``exchange_type`` the exchange is declared first (durable)."""
    connection = _connect(url)
    try:
        channel = connection.channel()
        if exchange_type is not None:
            channel.exchange_declare(exchange, exchange_type, durable=True)
        channel.queue_declare(name, durable=True, arguments=arguments)
        channel.queue_bind(name, exchange, binding_key)
    finally:
        connection.close()


def delete(
    url: str, *, queues: tuple[str, ...] | list[str] = (), exchanges: tuple[str, ...] | list[str] = ()
) -> None:
    """Delete queues and exchanges, ignoring those that do not exist."""
    connection = _connect(url)
    try:
        for kind, names in (("queue", queues), ("exchange", exchanges)):
            for name in names:
                channel = connection.channel()
                with contextlib.suppress(Exception):
                    if kind == "queue":
                        channel.queue_delete(name)
                    else:
                        channel.exchange_delete(name)
                with contextlib.suppress(Exception):
                    channel.close()
    finally:
        connection.close()


def queue_depth(url: str, queue: str) -> int:
    connection = _connect(url)
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def consistent_hash_available(url: str) -> bool:
    """Whether the broker knows the x-consistent-hash exchange type (its plugin is enabled).
    An unknown type makes RabbitMQ close the whole connection, so a throwaway one is used."""
    name = f"relay-probe-{uuid.uuid4().hex[:8]}"
    connection = _connect(url)
    try:
        channel = connection.channel()
        channel.exchange_declare(name, "x-consistent-hash", auto_delete=True)
        channel.exchange_delete(name)
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            connection.close()


def drain_queue(url: str, queue: str, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Take messages off ``queue`` until ``expected`` arrived or ``timeout`` passed, then whatever
    else arrives within 0.2 s (duplicates, strays); return them in queue order as dicts with body,
    properties (message_id, type, timestamp, content_type, delivery_mode), headers, routing_key,
    exchange, redelivered. Taken messages are acknowledged, so the queue is emptied of them.
    Callers assert on what they got: fewer than expected means lost."""
    deadline = time.monotonic() + timeout
    messages: list[dict[str, Any]] = []
    connection = _connect(url)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        quiet_since: float | None = None
        for method, properties, body in channel.consume(queue, inactivity_timeout=0.05):
            now = time.monotonic()
            if method is None:
                if len(messages) >= expected:
                    quiet_since = quiet_since or now
                    if now - quiet_since >= 0.2:
                        break
                if now >= deadline:
                    break
                continue
            quiet_since = None
            messages.append(_message(method, properties, body))
            channel.basic_ack(method.delivery_tag)
        # Unacknowledged deliveries still in the prefetch buffer go back to the queue.
        channel.cancel()
    finally:
        connection.close()
    return messages


def _message(method: Any, properties: Any, body: bytes) -> dict[str, Any]:
    headers = properties.headers or {}
    return {
        "body": body,
        "properties": {
            "message_id": properties.message_id,
            "type": properties.type,
            "timestamp": properties.timestamp,
            "content_type": properties.content_type,
            "delivery_mode": properties.delivery_mode,
        },
        "headers": {k: v.decode() if isinstance(v, bytes) else v for k, v in headers.items()},
        "routing_key": method.routing_key,
        "exchange": method.exchange,
        "redelivered": method.redelivered,
    }


# -- small helpers ---------------------------------------------------------------------------


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port or 5672}").geturl()


def _wait_port_closed(address: tuple[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_accepts(*address):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{address[0]}:{address[1]} still accepts connections {timeout:g}s after the stop")
