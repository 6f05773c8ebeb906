"""Two outboxes reading one table through two spellings of one server are refused by
`check --connect` and by `run`, which ask the servers (the config alone cannot tell)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import yaml

from tests.conftest import run_cli
from tests.support import insert_events, relay_config, write_config


def _two_spellings(dsn: str, tmp_path: Path) -> Path:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    assert params.get("host") == "127.0.0.1", params
    other = psycopg.conninfo.make_conninfo(dsn, host="localhost")
    first = relay_config(dsn, {"type": "file", "path": str(tmp_path / "a.jsonl")})["outboxes"][0]
    second = relay_config(other, {"type": "file", "path": str(tmp_path / "b.jsonl")})["outboxes"][0]
    second["name"] = "invoices"
    return write_config(tmp_path, {"outboxes": [first, second], "http": {"port": 0}})


def test_check_connect_and_run_refuse_one_table_read_through_two_spellings_of_its_server(
    dsn: str, tmp_path: Path
) -> None:
    path = _two_spellings(dsn, tmp_path)
    assert run_cli("check", "-c", str(path)).returncode == 0, "the config alone cannot tell"
    check = run_cli("check", "-c", str(path), "--connect")
    assert check.returncode == 1, check.stdout + check.stderr
    [problem] = yaml.safe_load(check.stdout)["shared reads"]
    assert "outboxes[1].source.table: table public.outbox is also read by outbox 'orders'" in problem
    machine = json.loads(run_cli("check", "-c", str(path), "--connect", "--json").stdout)
    assert machine["ok"] is False
    assert machine["shared reads"] == [problem]

    insert_events(dsn, 10)
    run = run_cli("run", "-c", str(path), "--drain", timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "is also read by outbox 'orders'" in run.stderr
    assert not (tmp_path / "a.jsonl").exists(), "nothing relayed"
    assert not (tmp_path / "b.jsonl").exists(), "nothing relayed"
