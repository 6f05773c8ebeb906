"""RELAY_TEST_SERVERS as the harnesses read it, on a machine without a Docker engine: no
container is started here (tests/integration/test_server_containers.py starts one where it can)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import containers, docker_engine
from tests.harness.kafka import start_kafka
from tests.harness.postgres import start_postgres
from tests.harness.server_choice import MODE_ENV_VAR, Availability, ServerChoiceError

MISSING_SOCKET = "/nonexistent/relay-test/docker.sock"


@pytest.fixture(autouse=True)
def no_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine's address is a socket that does not exist; no server is configured."""
    for name in ("RELAY_TEST_PG_DSN", "KAFKA_BOOTSTRAP_SERVERS", "RELAY_TEST_AMQP_URL", MODE_ENV_VAR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(docker_engine, "engine_address", lambda: f"unix://{MISSING_SOCKET}")
    _forget()
    yield
    _forget()


def _forget() -> None:
    docker_engine.engine_availability.cache_clear()
    docker_engine.engine_client.cache_clear()
    docker_engine.image_availability.cache_clear()


def test_a_missing_engine_socket_is_seen_without_connecting_and_named() -> None:
    found = docker_engine.engine_availability()
    assert found == Availability(False, f"no Docker engine: {MISSING_SOCKET} does not exist")
    assert docker_engine.engine_client() is None


@pytest.mark.parametrize("server", sorted(containers.SERVERS))
def test_auto_falls_back_to_a_process_when_no_engine_answers(server: str) -> None:
    choice = containers.choice_for(server)
    assert (choice.kind, choice.reason) == ("process", f"no Docker engine: {MISSING_SOCKET} does not exist")


def test_containers_mode_without_an_engine_is_refused_with_one_line_naming_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MODE_ENV_VAR, "containers")
    with pytest.raises(ServerChoiceError) as raised:
        start_postgres()
    assert str(raised.value) == (
        f"{MODE_ENV_VAR}=containers, but no container for PostgreSQL:"
        f" no Docker engine: {MISSING_SOCKET} does not exist"
    )


def test_processes_mode_never_asks_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> Availability:
        raise AssertionError("the engine was asked")

    monkeypatch.setattr(containers, "engine_availability", refuse)
    monkeypatch.setenv(MODE_ENV_VAR, "processes")
    assert {containers.choice_for(server).kind for server in containers.SERVERS} == {"process"}


def test_a_configured_server_is_used_without_asking_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containers, "engine_availability", lambda: pytest.fail("the engine was asked"))
    monkeypatch.setenv(MODE_ENV_VAR, "containers")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert containers.choice_for("kafka").kind == "configured"


def test_a_bad_switch_value_stops_a_harness_with_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODE_ENV_VAR, "docker")
    with pytest.raises(ServerChoiceError, match=r"^RELAY_TEST_SERVERS='docker': must be one of auto, "):
        start_kafka()
