from __future__ import annotations

from relay.secrets import SecretScrubber, redact_url


def test_url_and_keyword_dsn_passwords_are_masked() -> None:
    assert redact_url("postgresql://app:s3cr3t@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact_url("host=db user=app password=s3cr3t dbname=x") == "host=db user=app password=*** dbname=x"
    assert redact_url("amqp://guest:guest@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"


def test_scrubber_removes_remembered_passwords_from_any_text() -> None:
    scrubber = SecretScrubber()
    scrubber.remember_from("postgresql://app:p%40ss-word@db/x")
    text = "FATAL: password authentication failed (tried p@ss-word)"
    assert "p@ss-word" not in scrubber.scrub(text)


def test_settings_named_like_secrets_are_recognised() -> None:
    from relay.secrets import is_secret_key

    for name in ("sasl.password", "ssl.key.password", "ssl.key.pem", "api_token", "client_secret"):
        assert is_secret_key(name), name
    for name in ("acks", "linger.ms", "sasl.username", "bootstrap_servers"):
        assert not is_secret_key(name), name
