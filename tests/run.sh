#!/usr/bin/env bash
# The project's test command: start the test servers, then build and test the whole workspace.
#   tests/run.sh            every test
#   tests/run.sh files      only tests whose name contains "files" (arguments go to cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."

tests/services.sh start
# shellcheck disable=SC1090
source "$(tests/services.sh env)"
export BK_TEST_SERVICES=1   # tests that need a server fail instead of skipping

cargo build --workspace --all-targets
status=0
cargo test --workspace "$@" || status=$?
exit "$status"
