"""The log processors: every field scrubbed, and a huge field cut before it costs anything."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from outbox_relay.logs import configure_logging, get_logger
from outbox_relay.secrets import scrubber

MB = 1_000_000


@pytest.fixture
def json_logs(capfd: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Captured output; each test configures JSON logs itself, once capturing has begun."""
    yield capfd
    structlog.reset_defaults()


def _last_line(err: str) -> dict[str, Any]:
    line: dict[str, Any] = json.loads(err.strip().splitlines()[-1])
    return line


@pytest.mark.timeout(120)
def test_a_log_field_of_ten_megabytes_is_cut_with_its_length_noted_and_costs_little(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    secret = f"pw-{uuid.uuid4().hex}"
    scrubber.remember(secret)
    huge = f"order-{secret}-" + "a" * (10 * MB)
    started = time.perf_counter()
    get_logger(aggregate_id=huge).warning("event unroutable", error=ValueError(huge))
    elapsed = time.perf_counter() - started
    err = json_logs.readouterr().err
    line = _last_line(err)
    assert elapsed < 2.0, f"{elapsed:.1f}s to log one line"
    assert len(err) < 20_000
    assert line["aggregate_id"].startswith("order-***-aaa")
    assert line["aggregate_id"].endswith(f"[{len(huge)} characters, cut]")
    assert line["error"].startswith("ValueError: order-***-aaa")
    assert secret not in err


def test_secrets_inside_dicts_and_lists_of_a_log_line_are_masked_too(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure_logging("json", "info")
    secret = f"pw-{uuid.uuid4().hex}"
    scrubber.remember(secret)
    get_logger().warning(
        "settings", settings={"dsn": f"postgresql://app:{secret}@db/x", "servers": [f"x {secret}"]}
    )
    err = json_logs.readouterr().err
    line = _last_line(err)
    assert secret not in err
    assert line["settings"]["dsn"] == "postgresql://app:***@db/x"
    assert line["settings"]["servers"] == ["x ***"]
