"""relay.pgsession: the session settings every connection of the relay carries."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from outbox_relay.pgsession import session_conninfo


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://relay:secret@db:5432/app",
        "postgresql://relay@db/app?options=-csearch_path%3Dapp",
        "host=db dbname=app options='-c search_path=app -c statement_timeout=5s'",
    ],
)
def test_the_connection_asks_for_utf8_and_keeps_the_dsns_own_options(dsn: str) -> None:
    """The other pinned settings are SET once connected: options given here, by PGOPTIONS or by a
    service file must stay as they are."""
    params = conninfo_to_dict(session_conninfo(dsn))
    assert params["client_encoding"] == "UTF8"
    assert params.get("options") == conninfo_to_dict(dsn).get("options")
    assert params["dbname"] == "app"
    assert params["host"] == "db"


def test_a_client_encoding_in_the_dsn_is_overridden() -> None:
    assert (
        conninfo_to_dict(session_conninfo("dbname=app client_encoding=LATIN1"))["client_encoding"] == "UTF8"
    )
