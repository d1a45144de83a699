#!/usr/bin/env bash
# Benchmark: bk-dump mongodb beside a plain pymongo read of the same collections (raw BSON,
# nothing decoded: the floor for this server), on a generated database of about BENCH_MIB MiB
# of BSON (default 1024) spread over 8 collections. Prints wall time, throughput and peak RSS
# of each; no pass/fail. The server is the tests' nx-27017 (tests/services.sh start), a Python
# server: its own speed dominates, so compare the two lines of one run, not with a mongod.
#   tests/bench-mongodb.sh        BENCH_MIB=128 tests/bench-mongodb.sh
#   BK_BIN=target/debug tests/bench-mongodb.sh   (another build's tools, no release build)
# Generating 1 GiB takes nx-27017 about 4 minutes; the database bk_bench stays for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${BENCH_MIB:-1024}
work=${BENCH_DIR:-/tmp/bk-bench-mongodb}
source "$(tests/services.sh env)"
command -v /usr/bin/time >/dev/null || { echo "bench: /usr/bin/time is missing" >&2; exit 69; }
if [ -z "${BK_BIN:-}" ]; then cargo build --release --quiet --bins; fi
bin=${BK_BIN:-$PWD/target/release}
"$bin/bk" --install-links 2>/dev/null
mkdir -p "$work"; chmod 700 "$work"
export BK_LOCK_DIR=$work/locks BK_TEST_MONGO_URL=$TEST_MONGO_URL
docs=$(( mib * 1024 / 8 ))   # per collection: 8 collections of ~1 KiB documents

echo "== nx-27017 at $TEST_MONGO_URL: bk_bench, 8 collections of $docs documents of ~1 KiB"
"$TEST_MONGO_PYTHON" - "$docs" <<'PY'
import os, sys
from pymongo import MongoClient
docs = int(sys.argv[1])
db = MongoClient(os.environ["BK_TEST_MONGO_URL"])["bk_bench"]
for c in range(8):
    coll = db[f"c{c}"]
    if coll.estimated_document_count() == docs:
        continue
    print(f"generating bk_bench.c{c}...", flush=True)
    coll.drop()
    for start in range(0, docs, 10000):
        coll.insert_many([{"_id": i, "name": f"name-{i}", "n": i / 7, "tags": ["a", "b", i],
                           "note": os.urandom(400).hex()} for i in range(start, min(start + 10000, docs))])
PY

measure() { # label command...
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
  read -r secs kib < "$work/time"
  printf '%-36s %8.2f s %8.1f MiB/s %8d KiB peak RSS\n' "$label" "$secs" "$(awk -v m="$mib" -v s="$secs" 'BEGIN { print m / s }')" "$kib"
}

measure "pymongo raw read (floor)" "$TEST_MONGO_PYTHON" -c '
import os
from bson import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
db = MongoClient(os.environ["BK_TEST_MONGO_URL"])["bk_bench"]
for c in range(8):
    for d in db.get_collection(f"c{c}", codec_options=CodecOptions(document_class=RawBSONDocument)).find().batch_size(1000):
        pass'
rm -rf "$work/store"
measure "bk-dump mongodb (zstd 3)" "$bin/bk-dump" mongodb --uri "$TEST_MONGO_URL" --database bk_bench --to "$work/store" -q
