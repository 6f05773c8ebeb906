from __future__ import annotations

import json
from pathlib import Path

import pytest

from outbox_relay.config import ConfigError, config_json_schema, load_config, parse_config
from outbox_relay.connectors.sources.postgres_polling import PostgresPollingConfig
from outbox_relay.durations import parse_duration

REPO = Path(__file__).resolve().parents[2]


def _outbox(**source: object) -> dict[str, object]:
    return {
        "name": "orders",
        "source": {"type": "postgres-polling", "dsn": "postgresql://u:pw@localhost/db", **source},
        "sink": {"type": "stdout"},
    }


def _problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "relay.yaml", env or {})
    return caught.value.problems


def test_durations_accept_milliseconds_seconds_minutes_and_plain_numbers() -> None:
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("5s") == 5.0
    assert parse_duration("1m") == 60.0
    assert parse_duration(2) == 2.0
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("5 parsecs")


def test_batch_size_below_one_names_file_key_and_reason() -> None:
    assert _problems({"outboxes": [_outbox(batch_size=0)]}) == [
        "relay.yaml: outboxes[0].source.batch_size: must be >= 1"
    ]


def test_unknown_keys_are_refused_at_every_level() -> None:
    data = {"outboxes": [{**_outbox(bacth_size=5), "extra": 1}], "htp": {}}
    problems = _problems(data)
    assert "relay.yaml: outboxes[0].source.bacth_size: unknown key" in problems
    assert "relay.yaml: outboxes[0].extra: unknown key" in problems
    assert "relay.yaml: htp: unknown key" in problems


def test_unknown_sink_type_lists_the_known_ones() -> None:
    data = {"outboxes": [{**_outbox(), "sink": {"type": "kafak"}}]}
    (problem,) = _problems(data)
    assert problem.startswith("relay.yaml: outboxes[0].sink: unknown type 'kafak' (known: ")
    assert "stdout" in problem
    assert "file" in problem


def test_missing_environment_variable_names_the_key() -> None:
    data = {"outboxes": [_outbox(dsn="${DATABASE_URL}")]}
    assert _problems(data) == [
        "relay.yaml: outboxes[0].source.dsn: environment variable DATABASE_URL is not set"
    ]


def test_environment_variables_and_defaults_are_interpolated() -> None:
    data = {"outboxes": [_outbox(dsn="${DB}", batch_size="${BATCH:-250}", poll_interval="${POLL:-1s}")]}
    config = parse_config(data, "relay.yaml", {"DB": "postgresql://localhost/x"})
    source = config.outboxes[0].source
    assert isinstance(source, PostgresPollingConfig)
    assert source.dsn == "postgresql://localhost/x"
    assert source.batch_size == 250
    assert source.poll_interval == 1.0


def test_a_default_replaces_a_variable_that_is_set_but_empty_as_in_a_shell() -> None:
    data = {"outboxes": [_outbox(batch_size="${BATCH:-250}", poll_interval="${POLL:-2s}")]}
    config = parse_config(data, "relay.yaml", {"BATCH": "", "POLL": "3s"})
    source = config.outboxes[0].source
    assert isinstance(source, PostgresPollingConfig)
    assert source.batch_size == 250
    assert source.poll_interval == 3.0


def test_a_variable_that_is_set_but_empty_without_a_default_stays_empty() -> None:
    data = {"outboxes": [_outbox(dsn="${DB}")]}
    assert _problems(data, {"DB": ""}) == ["relay.yaml: outboxes[0].source.dsn: is empty" + _EMPTY_DSN_TAIL]


def test_a_file_sink_path_from_a_variable_set_to_nothing_says_it_must_not_be_empty() -> None:
    data = {"outboxes": [{**_outbox(), "sink": {"type": "file", "path": "${OUT}"}}]}
    assert _problems(data, {"OUT": ""}) == ["relay.yaml: outboxes[0].sink.path: must not be empty"]


_EMPTY_DSN_TAIL = (
    " (libpq would connect to its defaults, a local socket and another database): give the"
    " database's connection string or URL"
)


def test_bad_duration_and_retry_bounds_are_explained() -> None:
    data = {"outboxes": [{**_outbox(poll_interval="soon"), "retry": {"initial": "5s", "max": "1s"}}]}
    problems = _problems(data)
    assert any(
        p.startswith("relay.yaml: outboxes[0].source.poll_interval: 'soon' is not a duration")
        for p in problems
    )
    assert "relay.yaml: outboxes[0].retry: max must be >= initial" in problems


def test_problems_never_echo_a_password() -> None:
    data = {"outboxes": [_outbox(batch_size="many", dsn="postgresql://u:hunter2secret@db/x")]}
    assert not any("hunter2secret" in p for p in _problems(data))


def test_duplicate_outbox_names_and_empty_outboxes_are_refused() -> None:
    assert _problems({"outboxes": [_outbox(), _outbox()]}) == [
        "relay.yaml: (top): outbox name 'orders' is used twice"
    ]
    assert _problems({"outboxes": []}) == ["relay.yaml: outboxes: must have at least 1 item(s)"]


def test_unreadable_empty_and_invalid_yaml_files_get_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read the file"):
        load_config(missing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty"):
        load_config(empty)
    broken = tmp_path / "broken.yaml"
    broken.write_text("outboxes:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+:\d+: invalid YAML"):
        load_config(broken)
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("http: {port: 1}\nhttp: {port: 2}\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:2:1: invalid YAML: duplicate key 'http'"):
        load_config(duplicated)


def test_shipped_examples_are_valid() -> None:
    examples = sorted((REPO / "config").glob("*.yaml"))
    assert examples, "config/ ships example files"
    env = {"DATABASE_URL": "postgresql://localhost/app"}
    for example in examples:
        load_config(example, env)


def test_committed_json_schema_matches_the_model() -> None:
    committed = json.loads((REPO / "config" / "relay.schema.json").read_text())
    assert committed == config_json_schema(), "regenerate: outbox-relay schema > config/relay.schema.json"


def test_lease_keys_differ_by_what_the_outbox_reads_and_never_collide_like_a_crc32_of_the_name() -> None:
    from outbox_relay.leadership import lease_key

    assert lease_key("orders", "table public.outbox") != lease_key("orders", "table public.billing_outbox")
    assert lease_key("plumless") != lease_key("buckeroo")  # (their CRC32 is the same)
    assert lease_key("orders", "slot outbox_relay") == lease_key("orders", "slot outbox_relay")


@pytest.mark.parametrize(
    ("source", "key"),
    [({}, "query_timeout"), ({"type": "postgres-logical"}, "receive_timeout")],
)
def test_a_data_path_timeout_is_off_at_zero_refused_below_a_second_and_a_minute_by_default(
    source: dict[str, object], key: str
) -> None:
    assert (
        getattr(parse_config({"outboxes": [_outbox(**source)]}, "r.yaml", {}).outboxes[0].source, key) == 60.0
    )
    off = parse_config({"outboxes": [_outbox(**source, **{key: 0})]}, "r.yaml", {})
    assert getattr(off.outboxes[0].source, key) == 0.0
    [problem] = _problems({"outboxes": [_outbox(**source, **{key: "500ms"})]})
    assert problem.startswith(f"relay.yaml: outboxes[0].source.{key}: ")
    assert "must be 0 (off) or at least 1s" in problem
