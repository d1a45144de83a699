#!/usr/bin/env bash
# Benchmark: bk-ship of a 1 GiB artifact to the S3 test server (s3s-fs), beside `aws s3 cp`
# and `rclone copy` of the same file to the same server in the same run. Prints wall time,
# throughput and peak RSS of each, and bk-ship's ratios; no pass/fail (the goals: bk-ship
# under 64 MiB of RSS, at least as fast as the others). bk-ship checks the stored object by its
# ETag (S3's MD5 of the parts), as s3s-fs gives them: no second transfer.
# Needs the test servers: tests/services.sh start.
#   tests/bench-ship.sh            (1 GiB)   BENCH_MIB=256 tests/bench-ship.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${BENCH_MIB:-1024}
work=${BENCH_DIR:-/tmp/bk-bench-ship}
aws=${TOOLS:-/tmp/bk-test-tools}/venv/bin/aws
source "$(tests/services.sh env)"
for tool in /usr/bin/time rclone "$aws"; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (tests/services.sh installs it)" >&2; exit 69; }
done
# BK_BIN=DIR: the tools of another build (its bk), to compare builds in one run.
if [ -z "${BK_BIN:-}" ]; then cargo build --release --quiet --bins; fi
bin=${BK_BIN:-$PWD/target/release}
"$bin/bk" --install-links 2>/dev/null
mkdir -p "$work"; chmod 700 "$work"
export BK_LOCK_DIR=$work/locks

# One incompressible file, dumped without compression: the artifact is the file plus tar headers.
if [ "$(cat "$work/src.mib" 2>/dev/null)" != "$mib" ]; then
  rm -rf "$work/src" "$work/store"; mkdir -p "$work/src"
  head -c "${mib}M" /dev/urandom > "$work/src/random.bin"
  echo "$mib" > "$work/src.mib"
fi
if ! [ -s "$work/dumped.jsonl" ] || ! [ -d "$work/store" ]; then
  rm -rf "$work/store"
  "$bin/bk-dump" files "$work/src" --name bench-ship --compress none --to "$work/store" -q > "$work/dumped.jsonl"
fi
artifact=$(find "$work/store/bench-ship" -name '*.tar')
size=$(stat -c %s "$artifact")

# Every copy goes below one fresh prefix, removed at the end.
prefix=bench-ship-$$
dest=s3://$TEST_S3_BUCKET/$prefix
cat > "$work/rclone.conf" <<EOF
[bench]
type = s3
provider = Other
endpoint = $TEST_S3_ENDPOINT
access_key_id = $AWS_ACCESS_KEY_ID
secret_access_key = $AWS_SECRET_ACCESS_KEY
region = $AWS_DEFAULT_REGION
force_path_style = true
EOF
chmod 600 "$work/rclone.conf"
cleanup() { "$aws" --endpoint-url "$TEST_S3_ENDPOINT" s3 rm --recursive --quiet "$dest" || true; }
trap cleanup EXIT

declare -A mibps
measure() { # key label command...: prints "label  seconds  MiB/s  peak RSS"
  local key=$1 label=$2; shift 2
  sync
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" < "${stdin:-/dev/null}" >/dev/null
  read -r secs kib < "$work/time"
  mibps[$key]=$(awk -v s="$secs" -v b="$size" 'BEGIN { printf "%.1f", b / 1048576 / (s > 0 ? s : 0.01) }')
  printf '%-40s %8.2f s %9s MiB/s %8d KiB peak RSS\n' "$label" "$secs" "${mibps[$key]}" "$kib"
}

echo "artifact: $(( size / 1048576 )) MiB (incompressible) to $TEST_S3_ENDPOINT (s3s-fs)"
stdin=$work/dumped.jsonl measure bk "bk-ship --to s3:// (ETag-checked)" \
  env BK_S3_ENDPOINT="$TEST_S3_ENDPOINT" "$bin/bk-ship" --to "$dest/bk"
measure aws "aws s3 cp" "$aws" --endpoint-url "$TEST_S3_ENDPOINT" s3 cp --only-show-errors "$artifact" "$dest/aws/"
# (rclone's S3 client fails on AWS_CA_BUNDLE, set on some machines; the endpoint is plain http)
measure rclone "rclone copy" env -u AWS_CA_BUNDLE rclone --config "$work/rclone.conf" copy "$artifact" "bench:$TEST_S3_BUCKET/$prefix/rclone/"
awk -v b="${mibps[bk]}" -v a="${mibps[aws]}" -v r="${mibps[rclone]}" \
  'BEGIN { printf "bk-ship throughput: %.2fx aws s3 cp, %.2fx rclone copy\n", b / a, b / r }'
