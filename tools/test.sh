#!/usr/bin/env bash
# Install everything the tests need (tools/install.sh) and run the test suite against the
# installed package and its compiled library. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
venv=${SCAP_VENV:-.venv}
# `pytest` (not `python -m pytest`) keeps the source folder off sys.path, so the tests import
# the installed package, whose folder holds the compiled library.
exec "$venv/bin/pytest" -q "$@"
