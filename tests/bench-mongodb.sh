#!/usr/bin/env bash
# Benchmark: bk-dump mongodb beside a plain pymongo read of the same collections (raw BSON,
# nothing decoded: the floor for this server), and bk-restore beside a pymongo copy of them
# into another database (read and inserted as raw BSON), on two generated databases:
#   bk_bench      about BENCH_MIB MiB (default 1024) of ~1 KiB documents in 8 collections;
#   bk_bench_big  BENCH_BIG_DOCS (default 16) documents of 15 MiB, near the 16 MiB BSON limit,
#                 the worst case for memory (each reply holds one of them).
# Prints wall time, throughput and peak RSS of each; no pass/fail. The server is the tests'
# nx-27017 (tests/services.sh start), a Python server: its own speed dominates, so compare
# the lines of one run, not with a mongod.
#   tests/bench-mongodb.sh        BENCH_MIB=128 BENCH_BIG_DOCS=4 tests/bench-mongodb.sh
#   BK_BIN=target/debug tests/bench-mongodb.sh   (another build's tools, no release build)
# Generating 1 GiB takes nx-27017 about 4 minutes; the databases stay for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${BENCH_MIB:-1024}
big_docs=${BENCH_BIG_DOCS:-16}
work=${BENCH_DIR:-/tmp/bk-bench-mongodb}
source "$(tests/services.sh env)"
command -v /usr/bin/time >/dev/null || { echo "bench: /usr/bin/time is missing" >&2; exit 69; }
if [ -z "${BK_BIN:-}" ]; then cargo build --release --quiet --bins; fi
bin=${BK_BIN:-$PWD/target/release}
"$bin/bk" --install-links 2>/dev/null
mkdir -p "$work"; chmod 700 "$work"
export BK_LOCK_DIR=$work/locks BK_TEST_MONGO_URL=$TEST_MONGO_URL
docs=$(( mib * 1024 / 8 ))   # per collection: 8 collections of ~1 KiB documents

echo "== nx-27017 at $TEST_MONGO_URL: bk_bench, 8 collections of $docs documents of ~1 KiB;" \
     "bk_bench_big, $big_docs documents of 15 MiB"
"$TEST_MONGO_PYTHON" - "$docs" "$big_docs" <<'PY'
import os, sys
from bson import Binary
from pymongo import MongoClient
docs, big_docs = int(sys.argv[1]), int(sys.argv[2])
client = MongoClient(os.environ["BK_TEST_MONGO_URL"])
db = client["bk_bench"]
for c in range(8):
    coll = db[f"c{c}"]
    if coll.estimated_document_count() == docs:
        continue
    print(f"generating bk_bench.c{c}...", flush=True)
    coll.drop()
    for start in range(0, docs, 10000):
        coll.insert_many([{"_id": i, "name": f"name-{i}", "n": i / 7, "tags": ["a", "b", i],
                           "note": os.urandom(400).hex()} for i in range(start, min(start + 10000, docs))])
big = client["bk_bench_big"]["big"]
if big.estimated_document_count() != big_docs:
    print("generating bk_bench_big.big...", flush=True)
    big.drop()
    for i in range(big_docs):
        big.insert_one({"_id": i, "blob": Binary(os.urandom(15 << 20))})
PY

timed() { # output command...: "seconds KiB" of peak RSS
  local output=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$output"
  cat "$work/time"
}

# Every document of the database named by argv[1], as raw BSON (nothing decoded).
pymongo_read='
import os, sys
from bson import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
db = MongoClient(os.environ["BK_TEST_MONGO_URL"]).get_database(sys.argv[1], codec_options=CodecOptions(document_class=RawBSONDocument))
for name in db.list_collection_names():
    for d in db[name].find().batch_size(1000):
        pass'

# Every document of the database argv[1] inserted into argv[2] as raw BSON, 1000 a batch
# (mongorestore's), as bk-restore sends them.
pymongo_copy='
import os, sys
from bson import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
client = MongoClient(os.environ["BK_TEST_MONGO_URL"])
raw = CodecOptions(document_class=RawBSONDocument)
source, target = client.get_database(sys.argv[1], codec_options=raw), client[sys.argv[2]]
for name in source.list_collection_names():
    batch = []
    for d in source[name].find().batch_size(1000):
        batch.append(d)
        if len(batch) == 1000:
            target[name].insert_many(batch); batch = []
    if batch:
        target[name].insert_many(batch)'
drop() { "$TEST_MONGO_PYTHON" -c 'import os, sys; from pymongo import MongoClient; MongoClient(os.environ["BK_TEST_MONGO_URL"]).drop_database(sys.argv[1])' "$1"; }

for database in bk_bench bk_bench_big; do
  floor=$(timed /dev/null "$TEST_MONGO_PYTHON" -c "$pymongo_read" "$database")
  rm -rf "$work/store"
  bk=$(timed "$work/records" "$bin/bk-dump" mongodb --uri "$TEST_MONGO_URL" --database "$database" --to "$work/store")
  drop "${database}_copy"
  copy=$(timed /dev/null "$TEST_MONGO_PYTHON" -c "$pymongo_copy" "$database" "${database}_copy")
  drop "${database}_copy"
  restore=$(timed /dev/null "$bin/bk-restore" --from "$work/store" --name "mongodb-$database" -q \
    --uri "$TEST_MONGO_URL" --database "${database}_copy")
  drop "${database}_copy"
  # The archive's uncompressed size (its documents' BSON and the archive's few headers).
  bytes=$(grep '"type":"artifact"' "$work/records" | grep -o '"content_bytes":[0-9]*' | cut -d: -f2)
  printf -- '-- %s: %.0f MiB of BSON\n' "$database" "$(awk -v b="$bytes" 'BEGIN { print b / 1048576 }')"
  for line in "pymongo raw read (floor)|$floor" "bk-dump mongodb (zstd 3)|$bk" \
    "pymongo raw copy (floor)|$copy" "bk-restore mongodb|$restore"; do
    IFS='|' read -r label figures <<< "$line"
    read -r secs kib <<< "$figures"
    awk -v l="$label" -v s="$secs" -v k="$kib" -v b="$bytes" \
      'BEGIN { printf "%-28s %8.2f s %8.1f MiB/s %8.1f MiB peak RSS\n", l, s, b / 1048576 / s, k / 1024 }'
  done
done
