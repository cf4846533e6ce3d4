#!/usr/bin/env bash
# One command: set up on a fresh machine, then lint and run the whole test suite.
# The team-server tests also run against a real PostgreSQL server (scripts/test_postgres.sh
# starts one, installing Debian's package when missing; RESCALELAB_TEST_POSTGRES=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
RESCALELAB_EXTRAS="dev,team" bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
if [[ "${RESCALELAB_TEST_POSTGRES:-1}" != 0 && -z "${RESCALELAB_TEST_POSTGRES_URI:-}" ]]; then
  eval "$(bash scripts/test_postgres.sh start)"
  trap 'bash scripts/test_postgres.sh stop' EXIT
fi
# Two workers (one per core; every CLI run the tests start is one thread), one test file per
# worker at a time (module fixtures are built once); the slowest tests are listed at the end.
.venv/bin/python -m pytest -n 2 --dist loadfile --durations=30 "$@"
