"""A real PostgreSQL server for tests and benchmarks.

``start_postgres()`` returns a :class:`PostgresServer` that is either

* an **external** server named by the ``RELAY_TEST_PG_DSN`` environment variable
  (``owned`` is False: it is never stopped, restarted or deleted by us), or
* a **private cluster** initialised in a fresh temporary directory, listening on
  ``127.0.0.1`` on a free port, configured for logical replication and for speed
  (no fsync).  ``owned`` is True and the object may stop, start and restart it,
  always on the same port with the same data.

An owned cluster never outlives the process that started it: ``close()`` stops it and
deletes its directory, an exit hook does the same if the caller forgot, and a watchdog
process does it if the caller is killed outright (see ``tests/harness/process.py``).

Every subprocess call is bounded by a timeout, so a wedged server fails a test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.harness.process import (
    HOST,
    ClosesOnExit,
    ExitHook,
    StartError,
    Watchdog,
    address_in_use,
    log_tail,
    pick_port,
)

__all__ = ["DSN_ENV_VAR", "PostgresServer", "start_postgres"]

log = logging.getLogger(__name__)

DSN_ENV_VAR = "RELAY_TEST_PG_DSN"
"""Environment variable naming an external server to use instead of a private cluster."""

_SUPERUSER = "postgres"
_OS_USER = "postgres"
_STOP_MODES = ("smart", "fast", "immediate")

# pg_ctl waits up to this long itself; the subprocess timeout adds slack on top so
# that pg_ctl reports its own, more useful, error first.
_PG_CTL_WAIT_S = 60
_PG_CTL_TIMEOUT_S = _PG_CTL_WAIT_S + 30
_INITDB_TIMEOUT_S = 120
_CONNECT_TIMEOUT_S = 10
_DROP_DATABASE_TIMEOUT_S = 30.0

# Linux limits a unix socket path to 107 bytes; PostgreSQL appends "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")

_SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": f"'{HOST}'",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    # Durability is pointless for throw-away data and costs seconds per test run.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "128MB",
}

_PG_HBA = """\
# Written by tests/harness/postgres.py: a private, loopback-only test cluster.
local   all           all                    trust
local   replication   all                    trust
host    all           all     127.0.0.1/32   trust
host    replication   all     127.0.0.1/32   trust
"""


class PostgresServer(ClosesOnExit):
    """A PostgreSQL server for tests: a private cluster this object started, or an external one.

    Attributes:
        dsn: libpq URL of the admin database, e.g.
            ``postgresql://postgres@127.0.0.1:PORT/postgres`` for an owned cluster.
        owned: True when this object started the server; only then are
            :meth:`stop`, :meth:`start` and :meth:`restart` allowed.
        port: TCP port of an owned cluster (None for an external server).
        root: temporary directory holding the data directory, the unix socket and
            the server log of an owned cluster (None for an external server).
        data_dir: the cluster's data directory (None for an external server).
        log_path: the server log (None for an external server).

    Instances are context managers: leaving the ``with`` block calls :meth:`close`.
    Not thread-safe: use one instance from one thread at a time.
    """

    def __init__(
        self,
        dsn: str,
        *,
        owned: bool,
        port: int | None = None,
        root: Path | None = None,
        pg_ctl_prefix: list[str] | None = None,
    ) -> None:
        """Wrap a server; use :func:`start_postgres` rather than calling this directly."""
        self.dsn = dsn
        self.owned = owned
        self.port = port
        self.root = root
        self.data_dir = root / "data" if root is not None else None
        self.log_path = root / "postgres.log" if root is not None else None
        self._pg_ctl_prefix = pg_ctl_prefix or []
        self._closed = False
        self._watchdog = Watchdog()
        self._exit_hook = ExitHook(self)

    def __repr__(self) -> str:
        kind = "owned" if self.owned else "external"
        return f"<PostgresServer {kind} {_redact(self.dsn)}>"

    # -- lifecycle (owned clusters only) ---------------------------------------------

    def stop(self, mode: str = "fast") -> None:
        """Stop the owned server and return once it is down.

        ``mode`` is a ``pg_ctl`` shutdown mode: ``"smart"``, ``"fast"`` (default:
        disconnect clients, checkpoint) or ``"immediate"`` (no checkpoint, so the next
        start runs crash recovery: use it to simulate a crash).  Stopping a server that
        is not running is a no-op.  Raises ValueError for another mode, RuntimeError if
        not owned or if pg_ctl fails.
        """
        self._require_owned("stop")
        self._stop(mode)

    def _stop(self, mode: str) -> None:
        if mode not in _STOP_MODES:
            raise ValueError(f"stop mode must be one of {_STOP_MODES}, not {mode!r}")
        if self.pid() is None:
            return
        started = time.monotonic()
        result = self._pg_ctl("stop", "-w", "-t", str(_PG_CTL_WAIT_S), "-m", mode)
        if result.returncode != 0 and self.pid() is not None:
            raise RuntimeError(
                f"pg_ctl stop -m {mode} failed (exit {result.returncode}): "
                f"{result.stdout.strip()}\n{self._log_tail()}"
            )
        log.debug("postgres on port %s stopped (%s) in %.2fs", self.port, mode, time.monotonic() - started)

    def start(self) -> None:
        """Start the owned server on its port with its data, and return once it accepts connections.

        Starting a running server is a no-op, so after killing the postmaster yourself
        wait until :meth:`pid` returns None before calling this.  Raises RuntimeError
        (with the tail of the server log) if not owned or if the server does not come
        up within 60 s.
        """
        self._require_owned("start")
        if self.pid() is not None:
            return
        started = time.monotonic()
        stale = self._pid_file_pid()
        if stale is not None:
            # A killed postmaster stays a zombie until init reaps it (about 2 s under
            # some container inits), and a new postmaster refuses to start while the
            # pid in postmaster.pid exists at all.
            give_up = started + 30
            while Path(f"/proc/{stale}").exists() and time.monotonic() < give_up:
                time.sleep(0.05)
        # A postmaster killed with SIGKILL leaves backends behind for a moment, and
        # their shared memory makes a new postmaster refuse to start; they exit on
        # their own as soon as they notice, so retry briefly.
        deadline = started + 15
        while True:
            result = self._pg_ctl("start", "-w", "-t", str(_PG_CTL_WAIT_S), "-l", str(self.log_path))
            if result.returncode == 0:
                break
            tail = self._log_tail()
            if "pre-existing shared memory block" not in tail or time.monotonic() > deadline:
                raise StartError(
                    f"pg_ctl start failed (exit {result.returncode}): {result.stdout.strip()}\n{tail}",
                    address_in_use=address_in_use(tail),
                )
            time.sleep(0.5)
        # pg_ctl -w only waits for the postmaster to report "ready"; a real login
        # proves the port, pg_hba.conf and the superuser are all usable.
        _check_connects(self.dsn)
        log.debug("postgres on port %s started in %.2fs", self.port, time.monotonic() - started)

    def restart(self) -> None:
        """Stop (fast) and start the owned server; same port, same data."""
        self._require_owned("restart")
        self.stop("fast")
        self.start()

    def restart_command(self) -> str:
        """A shell command that restarts the owned server (for `outbox-relay drill --db-restart`)."""
        self._require_owned("restart")
        assert self.data_dir is not None
        assert self.log_path is not None
        args = ["-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60", "-m", "fast", "restart"]
        return shlex.join([*self._pg_ctl_prefix, *args])

    def pid(self) -> int | None:
        """Return the postmaster's pid when owned and running, else None."""
        pid = self._pid_file_pid()
        if pid is None:
            return None
        # The pid file survives a SIGKILLed postmaster, so check the process too.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # exists, just owned by another user
        # pg_ctl daemonizes the postmaster, so once killed it waits for init to reap
        # it, and some container inits never do: a zombie is not a running server.
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
        return pid

    def _pid_file_pid(self) -> int | None:
        if not self.owned or self.data_dir is None:
            return None
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        """Stop an owned server and delete its directory; a no-op for an external server.

        Idempotent.  Databases created on an external server are not dropped here: use
        :meth:`drop_database`.
        """
        if self._closed:
            return
        if self.owned:
            try:
                self._stop("fast")
            except RuntimeError:
                self._stop("immediate")
            # Only now that the server is down: deleting the directory under a live
            # server would leave an orphan that pg_ctl can no longer find.  If stopping
            # failed we never get here, and the atexit hook and watchdog stay armed.
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
            self._watchdog.disarm()
        self._closed = True
        self._exit_hook.disarm()

    # -- databases -------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create a database and return a DSN for it (same form as :attr:`dsn`).

        Without ``name`` a unique one (``relay_test_<hex>``) is generated, so parallel
        tests sharing an external server do not collide.  Raises psycopg errors as is
        (e.g. DuplicateDatabase when ``name`` exists).
        """
        if name is None:
            name = f"relay_test_{uuid.uuid4().hex[:16]}"
        if not name or len(name.encode()) > 63:
            raise ValueError(f"database name must be 1..63 bytes, got {name!r}")
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return _dsn_with_dbname(self.dsn, name)

    def drop_database(self, dsn_or_name: str) -> None:
        """Drop a database given its name or a DSN naming it; missing databases are ignored.

        Its backends are terminated first (pg_terminate_backend) and replication slots
        on it are dropped, since either makes DROP DATABASE fail; retries for up to 30 s
        while terminated backends finish exiting.  Refuses to drop the admin database
        and the templates.
        """
        name = _dbname_of(dsn_or_name)
        protected = {"template0", "template1", _dbname_of(self.dsn)}
        if name in protected:
            raise ValueError(f"refusing to drop database {name!r}")
        deadline = time.monotonic() + _DROP_DATABASE_TIMEOUT_S
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S) as conn:
            while True:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                try:
                    # Slots are only droppable once their walsender has exited, and
                    # termination above is asynchronous: hence the retry loop.
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE database = %s",
                        (name,),
                    )
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
                    return
                except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    # -- internals -------------------------------------------------------------------

    def _require_owned(self, action: str) -> None:
        if not self.owned:
            raise RuntimeError(
                f"cannot {action} an external server ({_redact(self.dsn)}); "
                f"unset {DSN_ENV_VAR} to get a private cluster"
            )
        if self._closed:
            raise RuntimeError(f"cannot {action}: this PostgresServer is closed")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert self.data_dir is not None
        return _run([*self._pg_ctl_prefix, "-D", str(self.data_dir), *args], _PG_CTL_TIMEOUT_S)

    def _log_tail(self) -> str:
        return log_tail(self.log_path)


def start_postgres(tmp_root: str | None = None, *, private: bool = False) -> PostgresServer:
    """Return a running PostgreSQL server for tests; with ``private``, always a private cluster
    (for a test that stops, restarts or reconfigures it).

    If ``RELAY_TEST_PG_DSN`` is set, that server is used as is (``owned=False``) after
    checking that it accepts a connection; RuntimeError (password redacted) if not.

    Otherwise, where a Docker engine can run the image, a container (tests/harness/containers.py;
    ``RELAY_TEST_SERVERS`` decides, see docs/test-servers.md), ``owned=False``.

    Otherwise a private cluster is initialised under ``tmp_root`` (default: the system
    temp directory; when running as root it must be traversable by the ``postgres``
    user and short enough for a unix socket path), started, and returned with
    ``owned=True``.  Needs PostgreSQL's ``initdb`` and ``pg_ctl`` on PATH or under
    ``/usr/lib/postgresql/*/bin``.  The caller must call :meth:`PostgresServer.close`
    (or use it as a context manager); an atexit hook and a watchdog process clean up
    if it does not.
    """
    if private:
        return _start_private_cluster(tmp_root)
    external = os.environ.get(DSN_ENV_VAR)
    if external:
        try:
            _check_connects(external)
        except RuntimeError as exc:
            raise RuntimeError(f"{DSN_ENV_VAR} is set but that server does not answer: {exc}") from None
        return PostgresServer(external, owned=False)
    from tests.harness import containers  # (it imports this module)

    if containers.wanted("postgres"):
        return containers.start_postgres_container()
    return _start_private_cluster(tmp_root)


def _start_private_cluster(tmp_root: str | None) -> PostgresServer:
    bin_dir = _find_bin_dir()
    prefix = _run_as_postgres_prefix()
    root = Path(tempfile.mkdtemp(prefix="relay-pg-", dir=tmp_root)).resolve()
    try:
        if len(str(root)) > _MAX_SOCKET_DIR_LEN:
            raise RuntimeError(f"temp dir {root} is too long for a unix socket path; pass a shorter tmp_root")
        if prefix:
            _hand_over_to_postgres_user(root, prefix)
        data_dir = root / "data"
        initdb = _run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                _SUPERUSER,
                "-E",
                "UTF8",
                # Ties collation to nothing installed on the host, so the cluster
                # behaves the same everywhere and initdb cannot fail on a missing locale.
                "--locale=C",
                "--auth=trust",
                "--no-sync",
            ],
            _INITDB_TIMEOUT_S,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {initdb.returncode}):\n{initdb.stdout}")
        (data_dir / "pg_hba.conf").write_text(_PG_HBA)
        with (data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# Added by tests/harness/postgres.py\ninclude 'harness.conf'\n")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise

    pg_ctl_prefix = [*prefix, str(bin_dir / "pg_ctl")]
    last_error: StartError | None = None
    # The port is free when picked but another process may take it before the
    # postmaster binds it (e.g. parallel test workers), so try a few.
    for _attempt in range(5):
        port = pick_port()
        _write_harness_conf(data_dir, root, port, chown=bool(prefix))
        server = PostgresServer(
            f"postgresql://{_SUPERUSER}@{HOST}:{port}/postgres",
            owned=True,
            port=port,
            root=root,
            pg_ctl_prefix=pg_ctl_prefix,
        )
        # Armed before the start so that even a crash of ours during start is covered.
        server._watchdog.arm(
            commands=[[*pg_ctl_prefix, "-D", str(data_dir), "stop", "-w", "-t", "30", "-m", "immediate"]],
            remove=root,
            env=_child_env(),
        )
        server._exit_hook.arm()
        try:
            server.start()
            return server
        except StartError as exc:
            last_error = exc
            if not exc.address_in_use:
                server.close()
                raise
            # Keep the directory for the next attempt; only drop this attempt's helpers.
            server._exit_hook.disarm()
            server._watchdog.disarm()
        except BaseException:
            server.close()
            raise
    shutil.rmtree(root, ignore_errors=True)
    assert last_error is not None
    raise last_error


def _write_harness_conf(data_dir: Path, root: Path, port: int, *, chown: bool) -> None:
    settings = {**_SERVER_SETTINGS, "port": str(port), "unix_socket_directories": f"'{root}'"}
    path = data_dir / "harness.conf"
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    if chown:
        user = pwd.getpwnam(_OS_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _find_bin_dir() -> Path:
    """Directory holding both initdb and pg_ctl: PATH first, else the newest Debian install."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        # Debian puts symlinks on PATH; resolving them finds the matching initdb.
        candidates.append(Path(on_path).resolve().parent)
        candidates.append(Path(on_path).parent)

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    for bin_dir in candidates:
        if all(os.access(bin_dir / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return bin_dir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
        "/usr/lib/postgresql/*/bin; install Debian's postgresql package "
        f"(apt-get install -y postgresql), or set {DSN_ENV_VAR} to use an existing server"
    )


def _run_as_postgres_prefix() -> list[str]:
    """Command prefix that runs a PostgreSQL tool as a non-root user; empty if not root."""
    # The server refuses to run as root, and so do initdb and pg_ctl.
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root but runuser (util-linux) is not installed")
    try:
        pwd.getpwnam(_OS_USER)
    except KeyError:
        # Debian's postgresql package creates this user; a bare image may not have it.
        created = _run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/var/lib/postgresql",
                "--shell",
                "/usr/sbin/nologin",
                _OS_USER,
            ],
            60,
        )
        if created.returncode != 0:
            raise RuntimeError(f"could not create system user {_OS_USER!r}: {created.stdout}") from None
    return [runuser, "-u", _OS_USER, "--"]


def _hand_over_to_postgres_user(root: Path, prefix: list[str]) -> None:
    user = pwd.getpwnam(_OS_USER)
    os.chown(root, user.pw_uid, user.pw_gid)
    # mkdtemp gives 0700 to root; a parent directory may still lock postgres out
    # (e.g. tmp_root under /root), which initdb would report far less clearly.
    probe = _run([*prefix, "test", "-w", str(root), "-a", "-x", str(root)], 30)
    if probe.returncode != 0:
        raise RuntimeError(
            f"user {_OS_USER!r} cannot use {root}: every parent directory must be "
            "traversable by it; pass a tmp_root such as /tmp"
        )


def _child_env() -> dict[str, str]:
    # PGDATA, PGPORT etc. from the caller's shell must not redirect our tools, and
    # English messages are what address_in_use() looks for.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout, output (stdout and stderr merged) captured as text."""
    # Output goes to a file, not a pipe: pg_ctl start leaves a daemon behind, and a
    # daemon holding our pipe open would make this wait forever.
    with tempfile.TemporaryFile() as out:
        try:
            completed = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd="/",  # the postgres user may not be able to enter our cwd
                env=_child_env(),
                check=False,
            )
        except subprocess.TimeoutExpired:
            out.seek(0)
            output = out.read().decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout}s:\n{output}") from None
        out.seek(0)
        return subprocess.CompletedProcess(
            cmd, completed.returncode, out.read().decode(errors="replace"), None
        )


def _check_connects(dsn: str) -> None:
    try:
        with psycopg.connect(dsn, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot connect to {_redact(dsn)}: {exc}") from None


def _redact(dsn: str) -> str:
    """The DSN with any password replaced by ``***``; safe for messages and logs."""
    if re.match(r"^postgres(ql)?://", dsn):
        parts = urllib.parse.urlsplit(dsn)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hostinfo = netloc.rsplit("@", 1)
            if ":" in userinfo:
                netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
        query = re.sub(r"(?i)(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable DSN>"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{key: str(value) for key, value in params.items()})


def _dbname_of(dsn_or_name: str) -> str:
    """The database named by a DSN, or the argument itself if it is a bare name."""
    if not re.match(r"^postgres(ql)?://", dsn_or_name) and "=" not in dsn_or_name:
        return dsn_or_name
    params = conninfo_to_dict(dsn_or_name)
    dbname = params.get("dbname") or params.get("user") or os.environ.get("USER", "")
    return str(dbname)


def _dsn_with_dbname(dsn: str, dbname: str) -> str:
    """The same DSN pointing at another database, keeping URL form if it was a URL."""
    if re.match(r"^postgres(ql)?://", dsn):
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.urlencode(
            [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "dbname"]
        )
        path = "/" + urllib.parse.quote(dbname, safe="")
        return urllib.parse.urlunsplit(parts._replace(path=path, query=query))
    return make_conninfo(dsn, dbname=dbname)
