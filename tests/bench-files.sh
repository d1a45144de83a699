#!/usr/bin/env bash
# Benchmark: a round trip of a 1 GiB directory through bk-dump files and bk-restore.
# Prints peak RSS and wall time of each, beside `tar | zstd` on the same data as the
# reference. Figures only, no pass/fail: compare ratios measured in one run.
#   tests/bench-files.sh            (1 GiB)   BENCH_MIB=256 tests/bench-files.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${BENCH_MIB:-1024}
work=${BENCH_DIR:-/tmp/bk-bench-files}
for tool in zstd /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install zstd time)" >&2; exit 69; }
done
# BK_BIN=DIR: the tools of another build (its bk), to compare builds in one run.
if [ -z "${BK_BIN:-}" ]; then cargo build --release --quiet --bins; fi
bin=${BK_BIN:-$PWD/target/release}
"$bin/bk" --install-links 2>/dev/null
export BK_LOCK_DIR=$work/locks

# Half incompressible, half text-like data, in files of 1 to 64 MiB plus many small ones.
if [ "$(cat "$work/src.mib" 2>/dev/null)" != "$mib" ]; then
  rm -rf "$work"; mkdir -p "$work/src/small"
  left=$mib; i=0
  while [ "$left" -gt 0 ]; do
    size=$(( (i % 7 == 0) ? 64 : (i % 3) * 8 + 1 )); [ "$size" -gt "$left" ] && size=$left
    if [ $((i % 2)) = 0 ]; then head -c "${size}M" /dev/urandom > "$work/src/f$i.bin"
    else head -c "$(( size * 786432 ))" /dev/urandom | base64 -w 120 > "$work/src/f$i.txt"; fi
    left=$((left - size)); i=$((i + 1))
  done
  for j in $(seq 1 2000); do echo "small file $j" > "$work/src/small/s$j"; done
  echo "$mib" > "$work/src.mib"
fi
rm -rf "$work/store" "$work/restore" "$work/ref.tar.zst"
size=$(du -sb "$work/src" | cut -f1)
sync

measure() { # label command...: prints "label  seconds  peak-RSS"
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
  read -r secs kib < "$work/time"
  awk -v l="$label" -v s="$secs" -v k="$kib" -v b="$size" \
    'BEGIN { printf "%-34s %8.2f s %9.1f MiB/s %8d KiB peak RSS\n", l, s, b / 1048576 / (s > 0 ? s : 0.01), k }'
}

echo "data: $(( size / 1048576 )) MiB in $(find "$work/src" -type f | wc -l) files"
measure "tar -c | zstd -3 (reference)" sh -c "tar -cf - -C '$work' src | zstd -3 -q -c > '$work/ref.tar.zst'"
measure "bk-dump files (zstd 3)" "$bin/bk-dump" files "$work/src" --name bench --to "$work/store" -q
measure "zstd -dc | tar -x (reference)" sh -c "mkdir -p '$work/ref' && zstd -dc '$work/ref.tar.zst' | tar -xf - -C '$work/ref'"
measure "bk-restore" "$bin/bk-restore" --from "$work/store" --name bench --to "$work/restore" -q
diff -r "$work/src" "$work/restore$work/src" >/dev/null && echo "restored tree identical"
rm -rf "$work/ref" "$work/restore"
