#!/usr/bin/env bash
# Benchmark: bk-dump and bk-restore against the plain tools, on a generated database whose
# plain dump is about BENCH_MIB MiB (default 1024), for MariaDB and PostgreSQL.
# Prints wall time and peak RSS of each; no pass/fail. Compare ratios measured in one run.
# Needs the test servers: tests/services.sh start.
#   tests/bench-db.sh [mysql|postgres|both]     BENCH_MIB=256 tests/bench-db.sh
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-both}
mib=${BENCH_MIB:-1024}
work=${BENCH_DIR:-/tmp/bk-bench-db}
source "$(tests/services.sh env)"
for tool in zstd gzip /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing" >&2; exit 69; }
done
# BK_BIN=DIR: the tools of another build (its bk), to compare builds in one run.
if [ -z "${BK_BIN:-}" ]; then cargo build --release --quiet --bins; fi
bin=${BK_BIN:-$PWD/target/release}
"$bin/bk" --install-links 2>/dev/null
mkdir -p "$work"; chmod 700 "$work"
export BK_LOCK_DIR=$work/locks
rows=$(( mib * 1024 * 1024 / 230 ))   # one row dumps as ~230 bytes

measure() { # label command...
  local label=$1; shift
  sync
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
  read -r secs kib < "$work/time"
  printf '%-44s %8.2f s %8d KiB peak RSS\n' "$label" "$secs" "$kib"
}

bench_mysql() {
  local cnf=$work/my.cnf sock=$TEST_MYSQL_SOCKET
  printf '[client]\nuser=test\npassword=testpw\nhost=127.0.0.1\nport=13306\n' > "$cnf"; chmod 600 "$cnf"
  if [ "$(mariadb -S "$sock" -uroot -N -e "SELECT COUNT(*) FROM bk_bench.t" 2>/dev/null)" != "$rows" ]; then
    echo "generating bk_bench ($rows rows)..."
    mariadb -S "$sock" -uroot -e "DROP DATABASE IF EXISTS bk_bench; CREATE DATABASE bk_bench; USE bk_bench;
      CREATE TABLE bk_bench.t (id INT PRIMARY KEY, name VARCHAR(64), note TEXT, n DOUBLE, at DATETIME) ENGINE=InnoDB;
      INSERT INTO bk_bench.t SELECT seq, CONCAT('name-', seq), REPEAT(MD5(seq), 4), seq / 7, NOW() - INTERVAL seq SECOND FROM seq_1_to_$rows;"
  fi
  mariadb -S "$sock" -uroot -e "DROP DATABASE IF EXISTS bk_bench_r"
  local dump="mariadb-dump --defaults-file=$cnf --single-transaction --quick --routines --triggers --events --hex-blob bk_bench"
  echo "== MariaDB: $(mariadb-dump --defaults-file="$cnf" --single-transaction --quick bk_bench | wc -c | awk '{printf "%d MiB", $1/1048576}') plain dump"
  measure "mariadb-dump > /dev/null (floor)" sh -c "$dump > /dev/null"
  measure "mariadb-dump | gzip" sh -c "$dump | gzip > $work/m.sql.gz"
  measure "mariadb-dump | zstd -3" sh -c "$dump | zstd -q -3 > $work/m.sql.zst"
  rm -rf "$work/store"
  measure "bk-dump mysql (zstd 3)" "$bin/bk-dump" mysql --defaults-file "$cnf" --database bk_bench --to "$work/store" -q
  mariadb -S "$sock" -uroot -e "CREATE DATABASE bk_bench_r"
  measure "zstd -dc | mariadb" sh -c "zstd -dc $work/m.sql.zst | mariadb --defaults-file=$cnf bk_bench_r"
  mariadb -S "$sock" -uroot -e "DROP DATABASE bk_bench_r"
  measure "bk-restore (mysql)" "$bin/bk-restore" --from "$work/store" --name mysql-bk_bench --defaults-file "$cnf" --database bk_bench_r -q
  mariadb -S "$sock" -uroot -e "DROP DATABASE bk_bench_r"
}

bench_postgres() {
  local pass=$work/pgpass; echo "127.0.0.1:15432:*:postgres:testpw" > "$pass"; chmod 600 "$pass"
  export PGPASSFILE=$pass PGHOST=127.0.0.1 PGPORT=15432 PGUSER=postgres
  if [ "$(psql -d bk_bench -tAc 'SELECT count(*) FROM t' 2>/dev/null)" != "$rows" ]; then
    echo "generating bk_bench ($rows rows)..."
    psql -q -c "DROP DATABASE IF EXISTS bk_bench" && psql -q -c "CREATE DATABASE bk_bench"
    psql -q -d bk_bench -c "CREATE TABLE t (id int PRIMARY KEY, name text, note text, n float8, at timestamptz);
      INSERT INTO t SELECT i, 'name-' || i, repeat(md5(i::text), 4), i / 7.0, now() - i * interval '1 second' FROM generate_series(1, $rows) i;"
  fi
  psql -q -c "DROP DATABASE IF EXISTS bk_bench_r"
  echo "== PostgreSQL: $(pg_dump -Fp bk_bench | wc -c | awk '{printf "%d MiB", $1/1048576}') plain dump"
  measure "pg_dump -Fc -Z0 > /dev/null (floor)" sh -c "pg_dump -Fc -Z0 bk_bench > /dev/null"
  measure "pg_dump -Fc (its own gzip)" sh -c "pg_dump -Fc bk_bench > $work/p.pgdump"
  measure "pg_dump -Fc -Z0 | gzip" sh -c "pg_dump -Fc -Z0 bk_bench | gzip > $work/p.pgdump.gz"
  measure "pg_dump -Fc -Z0 | zstd -3" sh -c "pg_dump -Fc -Z0 bk_bench | zstd -q -3 > $work/p.pgdump.zst"
  rm -rf "$work/store"
  measure "bk-dump postgres (zstd 3)" "$bin/bk-dump" postgres --dbname bk_bench --to "$work/store" -q
  psql -q -c "CREATE DATABASE bk_bench_r"
  measure "zstd -dc | pg_restore" sh -c "zstd -dc $work/p.pgdump.zst | pg_restore -d bk_bench_r"
  psql -q -c "DROP DATABASE bk_bench_r"
  measure "bk-restore (postgres)" "$bin/bk-restore" --from "$work/store" --name postgres-bk_bench --database bk_bench_r -q
  psql -q -c "DROP DATABASE bk_bench_r"
}

case $which in
  mysql) bench_mysql ;;
  postgres) bench_postgres ;;
  both) bench_mysql; bench_postgres ;;
  *) echo "usage: $0 [mysql|postgres|both]" >&2; exit 64 ;;
esac
rm -f "$work"/m.sql.* "$work"/p.pgdump*
