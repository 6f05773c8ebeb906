#!/usr/bin/env bash
# Installs the server binaries the integration tests need and are missing, from Debian's
# packages. The tests start their own servers on free loopback ports (or use the ones named by
# RELAY_TEST_PG_DSN, RELAY_TEST_AMQP_URL, ...), so the packages' own services are not started
# here. Idempotent, and quiet when everything is present.
set -euo pipefail

missing=()

have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
# A private PostgreSQL cluster with wal_level=logical (unless RELAY_TEST_PG_DSN names a server).
if [ -z "${RELAY_TEST_PG_DSN:-}" ] && ! have_postgres; then missing+=(postgresql); fi

have_rabbitmq() {
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]
}
# RabbitMQ: RELAY_TEST_AMQP_URL, else a node on 127.0.0.1:5672, else a private node.
if [ -z "${RELAY_TEST_AMQP_URL:-}" ] && ! have_rabbitmq; then missing+=(rabbitmq-server); fi

# NATS and Redis: the tests that pause or restart a server always start a private one.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then missing+=(nats-server); fi
if ! command -v redis-server >/dev/null 2>&1; then missing+=(redis-server); fi
# Prometheus: promtool unit-tests the chart's alert rules; prometheus scrapes a live relay.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  missing+=(prometheus)
fi

# podman, and the stand-in base image it builds ours from, for tests/deploy/test_image.py: installed
# or made when missing (the base once, about a minute). Exit 3: podman cannot run here (not root),
# and those tests skip saying so.
bash "$(dirname "$0")/deploy/podman-setup" || [ $? -eq 3 ]

[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing for the tests (Debian packages): ${missing[*]}"
# Keep the packages from starting their services: on a machine without an init system that step
# fails and would fail the install; the tests start what they need themselves.
policy=/usr/sbin/policy-rc.d
created_policy=no
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=yes
fi
cleanup() { [ "$created_policy" = yes ] && rm -f "$policy"; return 0; }
trap cleanup EXIT

apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

have_postgres || [ -n "${RELAY_TEST_PG_DSN:-}" ] || { echo "PostgreSQL's initdb is still missing" >&2; exit 1; }
