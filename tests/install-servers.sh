#!/usr/bin/env bash
# Installs what the integration tests need and is missing: PostgreSQL's server binaries (the tests
# start their own cluster with wal_level=logical on a free port). Skipped when RELAY_TEST_PG_DSN
# points the tests at an existing server. Idempotent and quiet when everything is present.
set -euo pipefail

have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if [ -z "${RELAY_TEST_PG_DSN:-}" ] && ! have_postgres; then
  echo "installing PostgreSQL (Debian package postgresql) for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# RabbitMQ: the tests use RELAY_TEST_AMQP_URL, else a node answering on 127.0.0.1:5672, else a
# private node they start themselves from Debian's rabbitmq-server package.
have_rabbitmq() {
  command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]
}

if [ -z "${RELAY_TEST_AMQP_URL:-}" ] && ! have_rabbitmq; then
  echo "installing RabbitMQ (Debian package rabbitmq-server) for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

# NATS with JetStream: the tests use RELAY_TEST_NATS_URL, else a server answering on 127.0.0.1:4222
# with JetStream, else a private `nats-server -js` they start themselves (Debian package nats-server).
# The tests that pause or restart the server always start a private one, so the binary is needed.
have_nats() {
  command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]
}

if ! have_nats; then
  echo "installing NATS (Debian package nats-server) for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi

# Redis: the tests use RELAY_TEST_REDIS_URL, else a server answering on 127.0.0.1:6379, else a
# private redis-server they start themselves (Debian package redis-server). The outage tests always
# start a private one, so the binary is needed even when a shared server answers.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing Redis (Debian package redis-server) for the tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
