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
