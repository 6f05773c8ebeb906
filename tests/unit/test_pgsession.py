"""relay.pgsession: the session settings every connection of the relay carries."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from relay.pgsession import session_conninfo

_PINNED = "-c DateStyle=ISO -c TimeZone=UTC -c bytea_output=hex -c extra_float_digits=3"


@pytest.mark.parametrize(
    ("dsn", "options"),
    [
        ("postgresql://relay:secret@db:5432/app", _PINNED),
        ("postgresql://relay@db/app?options=-csearch_path%3Dapp", f"-csearch_path=app {_PINNED}"),
        ("host=db dbname=app options='-c search_path=app -c statement_timeout=5s'",
         f"-c search_path=app -c statement_timeout=5s {_PINNED}"),
    ],
)  # fmt: skip
def test_the_pinned_settings_follow_the_dsns_own_options(dsn: str, options: str) -> None:
    params = conninfo_to_dict(session_conninfo(dsn))
    assert params["options"] == options  # later -c options win: the pinned ones come last
    assert params["client_encoding"] == "UTF8"
    assert params["dbname"] == "app" and params["host"] == "db"


def test_without_options_in_the_dsn_those_of_pgoptions_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGOPTIONS", "-c search_path=app")
    assert conninfo_to_dict(session_conninfo("dbname=app"))["options"] == f"-c search_path=app {_PINNED}"
    given = "dbname=app options='-c work_mem=1MB'"
    assert conninfo_to_dict(session_conninfo(given))["options"] == f"-c work_mem=1MB {_PINNED}"


def test_a_client_encoding_in_the_dsn_is_overridden() -> None:
    assert (
        conninfo_to_dict(session_conninfo("dbname=app client_encoding=LATIN1"))["client_encoding"] == "UTF8"
    )
