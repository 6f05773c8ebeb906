"""Where a test server comes from (tests/harness/server_choice.py), without any Docker engine."""

from __future__ import annotations

import pytest

from tests.harness.server_choice import (
    MODE_ENV_VAR,
    Availability,
    Choice,
    Mode,
    ServerChoiceError,
    choose,
    mode_from,
)

NO_ENGINE = Availability(False, "no Docker engine: /var/run/docker.sock does not exist")
ENGINE = Availability(True, "Docker engine at unix:///run/docker.sock")
NO_IMAGE = Availability(False, "image postgres:16 is not in the engine and cannot be pulled")
LOCAL_IMAGE = Availability(True, "image postgres:16 is in the engine")


class Probe:
    """A probe's scripted answer, counting how often it was asked."""

    def __init__(self, answer: Availability) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self) -> Availability:
        self.calls += 1
        return self.answer


def _never() -> Availability:
    raise AssertionError("this probe must not be asked")


def _choose(mode: Mode, engine: Availability, image: Availability, configured: str | None = None) -> Choice:
    return choose("PostgreSQL", configured=configured, mode=mode, engine=Probe(engine), image=Probe(image))


def test_without_an_engine_auto_falls_back_to_a_process_and_says_why() -> None:
    engine, image = Probe(NO_ENGINE), Probe(LOCAL_IMAGE)
    choice = choose("PostgreSQL", configured=None, mode=Mode.AUTO, engine=engine, image=image)
    assert choice == Choice("process", NO_ENGINE.detail)
    assert (engine.calls, image.calls) == (1, 0), "no image is asked for when no engine answers"


def test_an_engine_without_the_image_gives_a_process_in_auto_mode() -> None:
    assert _choose(Mode.AUTO, ENGINE, NO_IMAGE) == Choice("process", NO_IMAGE.detail)


def test_an_engine_with_the_image_gives_a_container() -> None:
    assert _choose(Mode.AUTO, ENGINE, LOCAL_IMAGE) == Choice("container", LOCAL_IMAGE.detail)
    assert _choose(Mode.CONTAINERS, ENGINE, LOCAL_IMAGE).kind == "container"


@pytest.mark.parametrize("mode", list(Mode))
def test_a_configured_server_wins_in_every_mode_and_no_engine_is_asked(mode: Mode) -> None:
    choice = choose("PostgreSQL", configured="RELAY_TEST_PG_DSN", mode=mode, engine=_never, image=_never)
    assert choice == Choice("configured", "RELAY_TEST_PG_DSN is set")


def test_processes_mode_never_asks_the_engine() -> None:
    choice = choose("Kafka", configured=None, mode=Mode.PROCESSES, engine=_never, image=_never)
    assert choice == Choice("process", f"{MODE_ENV_VAR}=processes")


@pytest.mark.parametrize(("engine", "image"), [(NO_ENGINE, LOCAL_IMAGE), (ENGINE, NO_IMAGE)])
def test_containers_mode_fails_with_the_reason_when_no_container_can_be_had(
    engine: Availability, image: Availability
) -> None:
    with pytest.raises(ServerChoiceError) as raised:
        _choose(Mode.CONTAINERS, engine, image)
    reason = image.detail if engine.ok else engine.detail
    assert str(raised.value) == f"{MODE_ENV_VAR}=containers, but no container for PostgreSQL: {reason}"


@pytest.mark.parametrize(
    ("raw", "mode"),
    [(None, Mode.AUTO), ("", Mode.AUTO), ("auto", Mode.AUTO), ("containers", Mode.CONTAINERS),
     ("processes", Mode.PROCESSES), (" Containers ", Mode.CONTAINERS)],
)  # fmt: skip
def test_the_switch_reads_each_mode_and_defaults_to_auto(raw: str | None, mode: Mode) -> None:
    environ = {} if raw is None else {MODE_ENV_VAR: raw}
    assert mode_from(environ) is mode


@pytest.mark.parametrize("raw", ["docker", "container", "process,containers"])
def test_a_bad_switch_value_is_one_clear_error_naming_the_variable_and_the_choices(raw: str) -> None:
    with pytest.raises(ServerChoiceError) as raised:
        mode_from({MODE_ENV_VAR: raw})
    assert str(raised.value) == f"{MODE_ENV_VAR}={raw!r}: must be one of auto, containers, processes"
