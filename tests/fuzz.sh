#!/usr/bin/env bash
# The property tests of the parsers that read hostile input, run longer than the suite does:
# the record reader and manifest parser, the SQL and COPY scanners, tar entry names, the
# mongodump archive reader.
#   tests/fuzz.sh           100000 cases each (a few minutes)
#   tests/fuzz.sh 1000000   more
# The suite (tests/run.sh) runs the same tests with proptest's default 256 cases. A failure
# prints the smallest input that fails; proptest saves it under proptest-regressions/ so that
# the next run tries it first: commit that file with the fix.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${1:-100000}"
cargo test --release -p bk-core -p bk-engines -- \
    parsed_artifacts_stay_in_their_name_directory any_input_reads_or_fails_cleanly \
    any_stream_scans_the_same_in_any_chunks any_script_scans_the_same_in_any_chunks \
    an_entry_is_refused_or_lands_strictly_inside_the_staging_directory any_archive_reads_or_fails_cleanly
