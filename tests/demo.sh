#!/usr/bin/env bash
# The README's first command: builds bk and runs a real backup -> list -> restore of a
# directory and of a SQLite database into a local store. No server is needed.
#   tests/demo.sh                 work in a new /tmp/bk-demo.XXXXXX (kept, so you can look)
#   BK_DEMO_DIR=/path tests/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

command -v cargo >/dev/null || { echo "demo: cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 69; }
missing=()
for tool in sqlite3 zstd; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  say "installing ${missing[*]} (apt)"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

say "building the tools (cargo build --release)"
build_start=$SECONDS
cargo build --release --quiet --bins
bin=$PWD/target/release
echo "built in $((SECONDS - build_start)) s: one binary, $bin/bk, of $(( $(stat -c %s "$bin/bk") / 1048576 )) MiB"
"$bin/bk" --install-links 2>/dev/null   # bk-dump, bk-ls, ... beside the one binary bk

demo=${BK_DEMO_DIR:-$(mktemp -d /tmp/bk-demo.XXXXXX)}
mkdir -p "$demo"
store=$demo/store
export BK_LOCK_DIR=$demo/locks
rm -rf "$demo/site" "$demo/app.db" "$store" "$demo/restored-site" "$demo/restored-app.db"

say "making something to back up in $demo"
mkdir -p "$demo/site/config" "$demo/site/uploads/2026" "$demo/site/empty"
echo "db_host = localhost" > "$demo/site/config/app.ini"
chmod 600 "$demo/site/config/app.ini"
head -c 300000 /dev/urandom > "$demo/site/uploads/2026/photo.jpg"
ln -s config/app.ini "$demo/site/current.ini"
sqlite3 "$demo/app.db" "PRAGMA journal_mode=wal;
  CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT, avatar BLOB);
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 1000)
  INSERT INTO users(name, avatar) SELECT 'user' || i, randomblob(64) FROM n;" >/dev/null

say "bk-dump files: back up the directory"
"$bin/bk-dump" files "$demo/site" --name demo-site --to "$store"

say "bk-dump sqlite: back up the database (consistent even while it is written to)"
"$bin/bk-dump" sqlite "$demo/app.db" --name demo-app --to "$store"

say "bk-ls: what the store holds"
"$bin/bk-ls" "$store" --format table

say "bk-restore: the directory, from the latest backup's record"
"$bin/bk-ls" "$store" --name demo-site --latest | "$bin/bk-restore" --to "$demo/restored-site"
diff -r "$demo/site" "$demo/restored-site$demo/site"
echo "restored tree is identical to the source"

say "bk-restore: the database, picked from the store by name"
"$bin/bk-restore" --from "$store" --name demo-app --latest --to "$demo/restored-app.db"
diff <(sqlite3 "$demo/app.db" .dump) <(sqlite3 "$demo/restored-app.db" .dump)
echo "restored database is identical to the source"

say "no lock-in: the same backups read with standard tools alone"
zstd -dc "$store"/demo-site/*.tar.zst | tar -tvf - | tail -n 3
zstd -dc "$store"/demo-app/*.sqlite.zst > "$demo/plain.db"
echo "sqlite3 integrity_check: $(sqlite3 "$demo/plain.db" 'PRAGMA integrity_check')"

say "done: everything is in $demo"
