from __future__ import annotations

import base64
import json
from urllib.parse import quote, quote_plus

import pytest

from outbox_relay.secrets import SecretScrubber, passwords_in, redact_url, secret_forms


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
    from outbox_relay.secrets import is_secret_key

    for name in ("sasl.password", "ssl.key.password", "ssl.key.pem", "api_token", "client_secret"):
        assert is_secret_key(name), name
    for name in ("acks", "linger.ms", "sasl.username", "bootstrap_servers"):
        assert not is_secret_key(name), name


# --- linear time, whatever the text -------------------------------------------------------------

MB = 1_000_000


def _shapes(size: int) -> dict[str, str]:
    """Texts that made the old URL-password pattern backtrack (quadratic time), and log-like text
    with a URL to mask every 100 characters, each `size` characters long."""
    many_urls = ("amqp://app:s3cr3t@rabbit:5672/ " + "retrying in 2s " * 5 + "." * 14) * (size // 100 + 1)
    return {
        "one long word (no ://)": "a" * size,
        "a password run without @": "x://u:" * (size // 6),
        "a user run without : or @": "x://" + "u" * size,
        "keyword DSNs with open quotes": ("password='\\'" + "k" * 50 + " ") * (size // 63),
        "many URLs with passwords": many_urls[:size],
    }


# No timing is asserted (a loaded machine would flake it): linear scrubbing of these takes well
# under a second, quadratic or worse never ends within the pytest timeout, which fails the test.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [MB, 10 * MB], ids=["1MB", "10MB"])
def test_scrubbing_a_value_of_megabytes_takes_linear_time_whatever_its_shape(size: int) -> None:
    scrubber = SecretScrubber()
    scrubber.remember_from("postgresql://app:hunter2-secret@db/x")
    for shape, text in _shapes(size).items():
        scrubbed = scrubber.scrub(text)
        if shape == "many URLs with passwords":
            assert "s3cr3t" not in scrubbed
            assert scrubbed.startswith("amqp://app:***@rabbit:5672/ ")


@pytest.mark.timeout(120)
def test_remembering_the_passwords_of_a_dsn_of_megabytes_takes_linear_time() -> None:
    long_dsn = "postgresql://app:pw-" + "p" * MB + "@db/x?application_name=" + "a" * MB
    scrubber = SecretScrubber()
    scrubber.remember_from(long_dsn)
    shown = scrubber.scrub(long_dsn)
    assert shown == "postgresql://app:***@db/x?application_name=" + "a" * MB


def test_url_passwords_are_masked_as_before_and_text_without_one_is_left_alone() -> None:
    cases = {
        "see http://host://x:y@h": "see http://host:***@h",
        "nats://a:b@h1, nats://c:d@h2": "nats://a:***@h1, nats://c:***@h2",
        "x://u:p q@h": "x://u:p q@h",
        "a://b/c:d@e": "a://b/c:d@e",
        "redis://:pw-only@h": "redis://:***@h",
        "plain text: no url, user:pass@host": "plain text: no url, user:pass@host",
    }
    for text, shown in cases.items():
        assert redact_url(text) == shown, text


# --- every form of a secret ---------------------------------------------------------------------


def test_every_form_of_a_url_password_is_masked_raw_percent_encoded_decoded_and_base64() -> None:
    scrubber = SecretScrubber()
    scrubber.remember_from("https://hook-user:p%40ss%20w%C3%B6rd@hooks.example.com/x")
    password = "p@ss wörd"
    forms = [
        password,
        "p%40ss%20w%C3%B6rd",
        base64.b64encode(f"hook-user:{password}".encode()).decode(),  # HTTP Basic auth
        base64.b64encode(password.encode()).decode(),
    ]
    for form in forms:
        text = f"401 Unauthorized: got {form!r} in Authorization"
        assert form not in scrubber.scrub(text), form


def test_an_authorization_header_is_masked_whole_by_its_credential_and_by_the_password_inside() -> None:
    scrubber = SecretScrubber()
    basic = base64.b64encode(b"svc:open-sesame-42").decode()
    scrubber.remember_authorization(f"Basic {basic}")
    scrubber.remember_authorization("Bearer tok-123456789")
    for text in (basic, "open-sesame-42", "tok-123456789", "Authorization: Bearer tok-123456789"):
        assert scrubber.scrub(text).count("***") >= 1
        assert "sesame" not in scrubber.scrub(text)
        assert "tok-1" not in scrubber.scrub(text)


def test_a_cut_value_never_shows_the_beginning_of_a_secret_wherever_the_cut_falls() -> None:
    scrubber = SecretScrubber()
    secret = "S3CRET-" + "z" * 40
    scrubber.remember(secret)
    limit = 100
    for offset in range(0, 500):
        text = "." * offset + secret + "." * 1000
        shown = scrubber.scrub_shortened(text, limit)
        assert "S3CR" not in shown, offset
        assert len(shown) < limit + 60
        assert f"[{len(text)} characters, cut]" in shown


def _echoed(value: str) -> dict[str, str]:
    """How a receiver may echo `value`: as is, percent-encoded (quote, quote_plus), as the inside
    of a JSON string (with and without `\\/` for `/`), and as base64url."""
    dumped = json.dumps(value)[1:-1]
    return {
        "raw": value,
        "quote safe=''": quote(value, safe=""),
        "quote": quote(value),
        "quote_plus": quote_plus(value),
        "json": dumped,
        "json with \\/": dumped.replace("/", "\\/"),
        "base64url": base64.urlsafe_b64encode(value.encode()).decode().rstrip("="),
    }


def test_a_bearer_token_is_masked_in_every_encoding_a_receiver_may_echo_it_in() -> None:
    scrubber = SecretScrubber()
    scrubber.remember_authorization("Bearer Tok/en+Secret/Val=")
    assert scrubber.scrub('{"token": "Tok\\/en+Secret\\/Val="}') == '{"token": "***"}'
    for value in ("Tok/en+Secret/Val=", "Bearer Tok/en+Secret/Val="):
        for form, echoed in _echoed(value).items():
            shown = scrubber.scrub(f"got <{echoed}>")
            assert echoed not in shown, (form, shown)
            assert "Secret" not in shown, (form, shown)


def test_basic_credentials_are_masked_in_every_encoding_of_the_pair_and_of_its_base64() -> None:
    scrubber = SecretScrubber()
    user, password = "relay", "pa>>ss~wd"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    assert "+" in basic  # cmVsYXk6cGE+PnNzfndk: percent-encoding changes it
    scrubber.remember_credentials(user, password)
    assert scrubber.scrub("Authorization=Basic+cmVsYXk6cGE%2BPnNzfndk") == "Authorization=Basic+***"
    for value in (password, f"{user}:{password}", basic, basic.rstrip("=")):
        for form, echoed in _echoed(value).items():
            shown = scrubber.scrub(f"got <{echoed}>")
            assert echoed not in shown, (value, form, shown)


def test_the_forms_percent_encoded_by_the_scrubber_are_exactly_what_urllib_makes_of_them() -> None:
    for value in ("p@ss wörd/1+2=3~_.-", "Tok/en+Secret/Val=", "a b\tc\x00\U0001f600"):
        forms = secret_forms(value)
        for encoded in (quote(value, safe=""), quote(value), quote_plus(value)):
            assert encoded in forms, (value, encoded)


@pytest.mark.parametrize(
    ("secret", "echoed"),
    [
        ("T0ken&abc<def>", "T0ken\\u0026abc\\u003cdef\\u003e"),  # Go's encoding/json
        ("T0ken&abc<def>", "T0ken&amp;abc&lt;def&gt;"),  # an HTML error page
        ('it\'s"x"&y', "it&#x27;s&quot;x&quot;&amp;y"),
        ('it\'s"x"&y', "it&#39;s&quot;x&quot;&amp;y"),
        ("Pa/ss+w0rd&x", "Pa%2fss%2bw0rd%26x"),  # percent-encoding in lower case
        ("Pa/ss+w0rd&x", "50612f73732b773072642678"),  # the bytes as hex
        ("Pa/ss+w0rd&x", "50612F73732B773072642678"),
    ],
)
def test_a_secret_echoed_html_escaped_go_json_escaped_lower_case_percent_encoded_or_as_hex_is_masked(
    secret: str, echoed: str
) -> None:
    scrubber = SecretScrubber()
    scrubber.remember(secret)
    assert scrubber.scrub(f"the receiver said: {echoed}.") == "the receiver said: ***."


def test_a_secret_with_two_spaces_or_a_tab_is_masked_in_a_setup_problem() -> None:
    from outbox_relay.problems import setup_problem
    from outbox_relay.secrets import scrubber

    scrubber.remember("two  spaces\tsecret")
    problem = setup_problem(RuntimeError("authentication failed for two  spaces\tsecret"))
    assert problem is not None
    assert "spaces" not in problem.text


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db dbname=app password=pw1x sslpassword=pw2x",
        "postgresql://app:pw1x@db/app?sslmode=require&sslpassword=pw2x",
    ],
)
def test_the_client_keys_password_is_a_secret_as_the_logins_is(dsn: str) -> None:
    """libpq's sslpassword decrypts the client's key: `check` showed it while masking password."""
    assert "pw2x" not in redact_url(dsn)
    assert "pw1x" not in redact_url(dsn)
    assert {"pw1x", "pw2x"} <= set(passwords_in(dsn))
