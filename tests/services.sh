#!/usr/bin/env bash
# Start (or stop) every server the bk test suite talks to, on loopback, in throwaway directories.
#
#   tests/services.sh [start]   install what is missing, start what is down, write $BASE/env
#   tests/services.sh stop      stop every server started from $BASE (safe when nothing runs)
#   tests/services.sh env       print the path of the env file (source it to get TEST_* variables)
#
# Made for Debian 12 run as root without systemd (installed packages do not start services).
# Idempotent: a second `start` only checks that each server answers. When $BASE survives but the
# servers are down (machine reused), they are started again on their existing data, not re-initialised.
#
# Environment: BASE (default /tmp/bk-test-services) holds data, logs, pidfiles and the env file;
# TOOLS (default /tmp/bk-test-tools) holds the Python venv and cargo-installed binaries;
# S3_IMPL=s3s-fs (default, the only one supported); READY_TIMEOUT seconds per server (default 60).
set -euo pipefail

BASE=${BASE:-/tmp/bk-test-services}
TOOLS=${TOOLS:-/tmp/bk-test-tools}
S3_IMPL=${S3_IMPL:-s3s-fs}
READY_TIMEOUT=${READY_TIMEOUT:-60}
PYTHON=${PYTHON:-python3}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
export DEBIAN_FRONTEND=noninteractive
export PATH="$PATH:/usr/sbin:/sbin:${HOME:-/root}/.cargo/bin"

APT_PACKAGES=(
  mariadb-server mariadb-client mariadb-backup postgresql openssh-server rsync
  influxdb influxdb-client sqlite3 zstd age cron time curl ca-certificates groff-base restic rclone python3-apt vsftpd
  python3-prometheus-client
)

# Ports (must match the env file below).
MYSQL_PORT=13306 PG_PORT=15432 MONGO_PORT=27018 INFLUX_HTTP_PORT=18086 INFLUX_RPC_PORT=18088
S3_PORT=18014 SSH_PORT=2222 SSH_USER=citest
FTP_PORT=2121 FTPS_PORT=2990 FTP_USER=bk FTP_READONLY_USER=bkro FTP_PASSWORD=bk-ftp-test-pw VSFTPD_PORT=2992
S3_AK=testak S3_SK=testsecret S3_BUCKET=test-bucket

t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
die() { echo "services.sh: error: $*" >&2; exit 1; }

# show_log FILE: last lines of a log on stderr, to explain a failure.
show_log() {
  [ -f "$1" ] || return 0
  echo "---- last lines of $1 ----" >&2
  tail -n 25 "$1" >&2 || true
  echo "----" >&2
}

# run_logged LOG CMD...: run quietly, keep output in LOG, show it if the command fails.
run_logged() {
  local log=$1; shift
  if ! "$@" >>"$log" 2>&1; then
    show_log "$log"
    die "command failed: $* (full output in $log)"
  fi
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }

# pid_alive PIDFILE: the pid in PIDFILE is a live process whose command line mentions $BASE
# (guards against stale pidfiles whose pid was reused by an unrelated process).
pid_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$BASE"
}

# wait_ready NAME LOG PIDFILE CHECK...: poll CHECK until it succeeds; fail naming the server and
# its log after READY_TIMEOUT seconds, or at once if the server process (PIDFILE, optional) died.
wait_ready() {
  local name=$1 log=$2 pidfile=$3; shift 3
  local deadline=$(( $(date +%s) + READY_TIMEOUT )) n=0
  until "$@" >/dev/null 2>&1; do
    n=$((n + 1))
    if [ -n "$pidfile" ] && [ $n -gt 20 ] && [ $((n % 10)) -eq 0 ] && ! pid_alive "$pidfile"; then
      # a last check: it may have come up and the pidfile been rewritten in between
      "$@" >/dev/null 2>&1 && return 0
      show_log "$log"
      die "$name exited before becoming ready; see $log"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      show_log "$log"
      die "$name not ready after ${READY_TIMEOUT}s; see $log"
    fi
    sleep 0.1
  done
}

# running PID: the process exists and is not a zombie (PID 1 may reap exited servers slowly).
running() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

# stop_pidfile NAME PIDFILE: TERM the process, wait up to 30 s, then KILL.
stop_pidfile() {
  local name=$1 pf=$2 pid n=0
  if pid_alive "$pf"; then
    pid=$(cat "$pf")
    echo "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while running "$pid"; do
      n=$((n + 1))
      if [ $n -gt 300 ]; then
        echo "$name did not stop in 30s; killing" >&2
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
  fi
  rm -f "$pf"
}

# ---------------------------------------------------------------------------------------------
install_packages() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "apt install: ${missing[*]}"
  [ "$(id -u)" = 0 ] || die "packages missing (${missing[*]}) and not root: cannot apt-get install"
  run_logged "$BASE/apt.log" apt-get update -qq
  run_logged "$BASE/apt.log" apt-get install -y -qq "${APT_PACKAGES[@]}"
}

# venv_install DIR WHAT PACKAGES...: a venv in DIR with PACKAGES (pip), made or completed.
venv_install() {
  local v=$1 what=$2; shift 2
  step "$what"
  [ -x "$v/bin/pip" ] || run_logged "$TOOLS/pip.log" "$PYTHON" -m venv "$v"
  run_logged "$TOOLS/pip.log" "$v/bin/pip" install -q "$@"
}

# cargo_install BIN CRATE@VERSION [ARGS...]: builds CRATE into $TOOLS/bin, outside the repo so that
# no project .cargo/config.toml applies; fails unless $TOOLS/bin/BIN then exists.
cargo_install() {
  local bin=$1 crate=$2; shift 2
  step "$crate build (cargo install; s3s-fs ~2 min, garage ~8 min on 2 idle cores)"
  command -v cargo >/dev/null || die "cargo not found (needed to build $crate)"
  (cd "$TOOLS" && run_logged "$TOOLS/cargo-install.log" cargo install --locked "$crate" --root "$TOOLS" "$@")
  [ -x "$TOOLS/bin/$bin" ] || die "$crate not installed; see $TOOLS/cargo-install.log"
}

install_python_tools() {
  local v="$TOOLS/venv"
  [ -x "$v/bin/nx-27017" ] && [ -x "$v/bin/aws" ] \
    && "$v/bin/python" -c 'import pymongo, pyftpdlib, OpenSSL' 2>/dev/null && return 0
  venv_install "$v" "python tools (nx-27017 mongo wire server, pymongo, awscli, pyftpdlib with pyOpenSSL for FTPS)" \
    nx-27017 pymongo awscli pyftpdlib pyOpenSSL
}

install_s3_server() {
  [ "$S3_IMPL" = s3s-fs ] || die "S3_IMPL=$S3_IMPL is not supported (only s3s-fs)"
  [ -x "$TOOLS/bin/s3s-fs" ] && return 0
  cargo_install s3s-fs s3s-fs@0.14.1 --features binary
}

# Ansible for tests/tests/ansible.rs: the `ansible` package (ansible-core with the community.mysql,
# .postgresql, .crypto collections; galaxy.ansible.com is not needed), ansible-lint, and the
# drivers the database modules import (the playbook runs modules with this venv's python).
ANSIBLE_PIP=(ansible==10.7.0 ansible-core==2.17.14 ansible-lint==24.12.2 PyMySQL==1.1.1 psycopg2-binary==2.9.10)
install_ansible() {
  local v="$TOOLS/ansible-venv"
  [ -x "$v/bin/ansible-playbook" ] && [ -x "$v/bin/ansible-lint" ] \
    && "$v/bin/python" -c 'import pymysql, psycopg2' 2>/dev/null && return 0
  venv_install "$v" "ansible venv (${ANSIBLE_PIP[*]})" "${ANSIBLE_PIP[@]}"
}

# Garage, a distributed S3 store: tests/tests/garage.rs runs a private 3-node cluster of it.
GARAGE_VERSION=2.5.0
install_garage() {
  "$TOOLS/bin/garage" --version 2>/dev/null | grep -qF "$GARAGE_VERSION" && return 0
  cargo_install garage "garage@$GARAGE_VERSION"
}

# ---------------------------------------------------------------------------------------------
mysql_ping() { mariadb-admin --socket="$BASE/mysql/run/sock" -uroot ping; }
mysql_tcp() { mariadb -h127.0.0.1 -P"$MYSQL_PORT" -utest -ptestpw -e 'select 1'; }

start_mariadb() {
  local d="$BASE/mysql"
  install -d -o mysql -g mysql "$d" "$d/run"
  if mysql_ping >/dev/null 2>&1; then
    step "mariadb: already running"
  else
    if ! pid_alive "$d/server.pid" && ! pid_alive "$d/run/pid"; then
      if [ ! -d "$d/data/mysql" ]; then
        step "mariadb: initialise"
        # initialise aside and move into place, so that an existing data dir is always complete
        rm -rf "$d/data" "$d/data.new"
        run_logged "$d/install-db.log" mariadb-install-db --user=mysql --datadir="$d/data.new" \
          --auth-root-authentication-method=socket --skip-test-db
        mv "$d/data.new" "$d/data"
      fi
      step "mariadb: start"
      setsid mariadbd --no-defaults --user=mysql --datadir="$d/data" --socket="$d/run/sock" \
        --pid-file="$d/run/pid" --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$d/err.log" </dev/null >/dev/null 2>&1 9>&- &
      echo $! >"$d/server.pid"
    fi
    local pf="$d/server.pid"; pid_alive "$pf" || pf="$d/run/pid"
    wait_ready mariadb "$d/err.log" "$pf" mysql_ping
  fi
  # idempotent: TCP logins come from 127.0.0.1 (skip-name-resolve), socket logins from localhost
  mariadb --socket="$d/run/sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'test'@'127.0.0.1' IDENTIFIED BY 'testpw';
    GRANT ALL ON *.* TO 'test'@'127.0.0.1' WITH GRANT OPTION;
    CREATE USER IF NOT EXISTS 'test'@'localhost' IDENTIFIED BY 'testpw';
    GRANT ALL ON *.* TO 'test'@'localhost' WITH GRANT OPTION;" \
    || { show_log "$d/err.log"; die "mariadb: could not create user test; see $d/err.log"; }
  wait_ready mariadb "$d/err.log" "" mysql_tcp
}

pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
  start_postgres_server
  postgres_tls
}

# postgres_tls: TLS for the tests of bk's sslmode handling. A private CA and a server
# certificate for the name localhost only (made once, under $BASE/pg/tls: so that verify-full
# to 127.0.0.1 fails where verify-ca passes), ssl = on, and the
# group role tls_only, whose members may log in over TCP with TLS only. Both settings are
# reloadable: a running server is reloaded, never restarted, and only when something changed.
postgres_tls() {
  local d="$BASE/pg" t="$BASE/pg/tls" conf="$BASE/pg/data/postgresql.conf" hba="$BASE/pg/data/pg_hba.conf"
  local changed=""
  if [ ! -f "$t/server.crt" ]; then
    step "postgres: TLS certificates"
    rm -rf "$t.new"; install -d -m 755 "$t.new"
    (
      cd "$t.new"
      local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
      run_logged openssl.log openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 36500 \
        -subj "/CN=bk test PostgreSQL CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign"
      run_logged openssl.log openssl req -new "${ec[@]}" -keyout server.key -out server.csr -subj "/CN=localhost"
      printf '%s\n' "subjectAltName=DNS:localhost" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
      run_logged openssl.log openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
        -days 36500 -extfile server.ext -out server.crt
      rm -f server.csr server.ext
      chmod 600 ca.key server.key; chown postgres server.key
    ) || die "postgres: could not make the TLS certificates; see $t.new/openssl.log"
    mv "$t.new" "$t"
    changed=1
  fi
  if ! grep -q '^# bk tests: TLS' "$conf"; then
    printf '%s\n' "# bk tests: TLS" "ssl = on" "ssl_cert_file = '$t/server.crt'" "ssl_key_file = '$t/server.key'" >>"$conf"
    changed=1
  fi
  if ! grep -q '+tls_only' "$hba"; then
    # first match wins: these go before initdb's rules
    { printf '%s\n' "# bk tests: members of tls_only log in over TCP with TLS only" \
        "hostssl all +tls_only 127.0.0.1/32 scram-sha-256" "hostnossl all +tls_only 127.0.0.1/32 reject"
      cat "$hba"; } >"$hba.new"
    cat "$hba.new" >"$hba"; rm -f "$hba.new"   # keeps the file's owner and mode
    changed=1
  fi
  local psql=(env PGPASSWORD=testpw "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres)
  if [ -n "$changed" ]; then
    step "postgres: TLS on (reload)"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d/data" reload >>"$d/pg_ctl.log" 2>&1 9>&- \
      || { show_log "$d/log"; die "postgres did not reload; see $d/log"; }
    wait_ready "postgres (TLS)" "$d/log" "" env PGSSLMODE=require "${psql[@]}" -c 'SELECT 1'
  fi
  "${psql[@]}" -c "DO \$\$ BEGIN CREATE ROLE tls_only NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$" \
    || die "postgres: could not create role tls_only"
}

start_postgres_server() {
  local d="$BASE/pg" pid
  install -d -o postgres -g postgres "$d"
  if pg_ready; then
    step "postgres: already running"
    return 0
  fi
  if [ ! -f "$d/data/PG_VERSION" ]; then
    step "postgres: initialise"
    # initialise aside and move into place, so that an existing data dir is always complete
    rm -rf "$d/data" "$d/data.new"
    echo testpw >"$d/pw"; chown postgres "$d/pw"; chmod 600 "$d/pw"
    run_logged "$d/initdb.log" runuser -u postgres -- "$PG_BIN/initdb" -D "$d/data.new" -U postgres \
      --pwfile="$d/pw" --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8
    mv "$d/data.new" "$d/data"
  fi
  if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d/data" status >/dev/null 2>&1; then
    wait_ready postgres "$d/log" "" pg_ready   # running but not answering yet
    return 0
  fi
  # a postmaster.pid left by a killed server whose pid now belongs to someone else blocks startup
  if [ -f "$d/data/postmaster.pid" ]; then
    pid=$(head -n1 "$d/data/postmaster.pid")
    if ! { [[ $pid =~ ^[0-9]+$ ]] && grep -q postgres "/proc/$pid/comm" 2>/dev/null; }; then
      rm -f "$d/data/postmaster.pid"
    fi
  fi
  step "postgres: start"
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d/data" -l "$d/log" -w -t "$READY_TIMEOUT" \
    -o "-p $PG_PORT -k $d -c listen_addresses=127.0.0.1" start >>"$d/pg_ctl.log" 2>&1 9>&- \
    || { show_log "$d/log"; die "postgres did not start; see $d/log"; }
  wait_ready postgres "$d/log" "" pg_ready
}

start_mongo() {
  local d="$BASE/mongo" pf="$BASE/mongo.pid"
  mkdir -p "$d"
  if tcp_open "$MONGO_PORT"; then
    step "mongo (nx-27017): already running"
    return 0
  fi
  if ! pid_alive "$pf"; then
    step "mongo (nx-27017): start"
    setsid "$TOOLS/venv/bin/nx-27017" --data-dir "$d" --host 127.0.0.1 -p "$MONGO_PORT" \
      --log-file "$d/log" --pid-file "$d/pid" </dev/null >>"$d/stdout.log" 2>&1 9>&- &
    echo $! >"$pf"
  fi
  wait_ready "mongo (nx-27017)" "$d/log" "$pf" tcp_open "$MONGO_PORT"
}

influx_ping() { curl -sf "http://127.0.0.1:$INFLUX_HTTP_PORT/ping"; }

start_influx() {
  local d="$BASE/influx"
  mkdir -p "$d"
  if influx_ping >/dev/null 2>&1; then
    step "influxdb: already running"
    return 0
  fi
  if ! pid_alive "$d/pid"; then
    step "influxdb: start"
    cat >"$d/conf" <<EOF
reporting-disabled = true
bind-address = "127.0.0.1:$INFLUX_RPC_PORT"
[meta]
  dir = "$d/meta"
[data]
  dir = "$d/data"
  wal-dir = "$d/wal"
[http]
  bind-address = "127.0.0.1:$INFLUX_HTTP_PORT"
[monitor]
  store-enabled = false
EOF
    setsid influxd run -config "$d/conf" -pidfile "$d/pid" </dev/null >>"$d/log" 2>&1 9>&- &
    echo $! >"$d/pid"   # influxd rewrites it with the same pid
  fi
  wait_ready influxdb "$d/log" "$d/pid" influx_ping
  wait_ready "influxdb (rpc)" "$d/log" "$d/pid" tcp_open "$INFLUX_RPC_PORT"
}

start_s3() {
  local d="$BASE/s3"
  mkdir -p "$d/root/$S3_BUCKET"   # a directory under root == a bucket
  if tcp_open "$S3_PORT"; then
    step "s3 (s3s-fs): already running"
    return 0
  fi
  if ! pid_alive "$d/pid"; then
    step "s3 (s3s-fs): start"
    setsid "$TOOLS/bin/s3s-fs" --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_AK" \
      --secret-key "$S3_SK" "$d/root" </dev/null >>"$d/log" 2>&1 9>&- &
    echo $! >"$d/pid"
  fi
  wait_ready "s3 (s3s-fs)" "$d/log" "$d/pid" tcp_open "$S3_PORT"
}

start_sshd() {
  local d="$BASE/ssh"
  id "$SSH_USER" >/dev/null 2>&1 || useradd -m -s /bin/bash "$SSH_USER"
  # unlock: sshd (UsePAM no) refuses '!' accounts
  [ "$(getent shadow "$SSH_USER" | cut -d: -f2)" = '*' ] || usermod -p '*' "$SSH_USER"
  mkdir -p "$d" /run/sshd
  [ -f "$d/host" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/host"
  [ -f "$d/id" ] || ssh-keygen -q -t ed25519 -N '' -f "$d/id"
  install -d -m 700 -o "$SSH_USER" -g "$SSH_USER" "/home/$SSH_USER/.ssh"
  install -m 600 -o "$SSH_USER" -g "$SSH_USER" "$d/id.pub" "/home/$SSH_USER/.ssh/authorized_keys"
  if tcp_open "$SSH_PORT"; then
    step "sshd: already running"
    return 0
  fi
  if ! pid_alive "$d/pid"; then
    step "sshd: start"
    printf '%s\n' "Port $SSH_PORT" "ListenAddress 127.0.0.1" "HostKey $d/host" "PidFile $d/pid" \
      "PasswordAuthentication no" "KbdInteractiveAuthentication no" "UsePAM no" \
      "Subsystem sftp internal-sftp" >"$d/config"
    /usr/sbin/sshd -f "$d/config" -E "$d/log" 9>&- || { show_log "$d/log"; die "sshd did not start; see $d/log"; }
  fi
  wait_ready sshd "$d/log" "" tcp_open "$SSH_PORT"
}

# ftp_cert DIR: a private CA and a server certificate for 127.0.0.1 signed by it (rustls refuses
# a CA certificate as the server's own, so a lone self-signed certificate will not do).
ftp_cert() {
  local d=$1
  [ -f "$d/server.pem" ] && [ -f "$d/ca.pem" ] && return 0
  run_logged "$d/openssl.log" openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=bk test CA" \
    -keyout "$d/ca.key" -out "$d/ca.pem.new"
  run_logged "$d/openssl.log" openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$d/server.key" -out "$d/server.csr"
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
    "extendedKeyUsage=serverAuth" >"$d/server.ext"
  run_logged "$d/openssl.log" openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem.new" -CAkey "$d/ca.key" \
    -CAcreateserial -days 3650 -extfile "$d/server.ext" -out "$d/server.pem.new"
  mv "$d/server.pem.new" "$d/server.pem"
  mv "$d/ca.pem.new" "$d/ca.pem"
}

# pyftpdlib in one process: plain FTP on $FTP_PORT and FTPS (explicit AUTH TLS, TLS required on
# both connections) on $FTPS_PORT; users $FTP_USER (read-write) and $FTP_READONLY_USER, both with
# $FTP_PASSWORD and the home $BASE/ftp/home.
start_ftp() {
  local d="$BASE/ftp"
  mkdir -p "$d/home"
  if tcp_open "$FTP_PORT" && tcp_open "$FTPS_PORT"; then
    step "ftp (pyftpdlib): already running"
    return 0
  fi
  if ! pid_alive "$d/pid"; then
    step "ftp (pyftpdlib): start"
    ftp_cert "$d"
    (umask 077; echo "$FTP_PASSWORD" >"$d/password")
    cat >"$d/server.py" <<'EOF'
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
from pyftpdlib.servers import FTPServer

base, ftp_port, ftps_port, user, readonly_user = sys.argv[1:6]
with open(f"{base}/password") as f:
    password = f.read().strip()
authorizer = DummyAuthorizer()
authorizer.add_user(user, password, f"{base}/home", perm="elradfmwMT")
authorizer.add_user(readonly_user, password, f"{base}/home", perm="elr")


class Plain(FTPHandler):
    pass


class Secure(TLS_FTPHandler):
    pass


for handler, ports in ((Plain, range(40100, 40200)), (Secure, range(40200, 40300))):
    handler.authorizer = authorizer
    handler.passive_ports = ports
Secure.certfile = f"{base}/server.pem"
Secure.keyfile = f"{base}/server.key"
Secure.tls_control_required = True
Secure.tls_data_required = True
# Both servers run on pyftpdlib's one IO loop.
FTPServer(("127.0.0.1", int(ftp_port)), Plain)
FTPServer(("127.0.0.1", int(ftps_port)), Secure).serve_forever()
EOF
    setsid "$TOOLS/venv/bin/python" "$d/server.py" "$d" "$FTP_PORT" "$FTPS_PORT" "$FTP_USER" "$FTP_READONLY_USER" \
      </dev/null >>"$d/log" 2>&1 9>&- &
    echo $! >"$d/pid"
  fi
  wait_ready "ftp (pyftpdlib)" "$d/log" "$d/pid" tcp_open "$FTP_PORT"
  wait_ready "ftps (pyftpdlib)" "$d/log" "$d/pid" tcp_open "$FTPS_PORT"
}

# vsftpd, the common Linux FTP server, as a second FTPS server unlike pyftpdlib: no MLSD (bk lists
# with LIST), and TLS session reuse required on data connections. Anonymous only (no system user
# or PAM), TLS required, uploads, directories, renames and deletes allowed in $BASE/vsftpd/root/pub.
start_vsftpd() {
  local d="$BASE/vsftpd"
  mkdir -p "$d/empty" "$d/root/pub"
  chmod 555 "$d/root"   # vsftpd refuses a chroot that its user may write
  chown ftp "$d/root/pub"
  if tcp_open "$VSFTPD_PORT"; then
    step "vsftpd: already running"
    return 0
  fi
  if ! pid_alive "$d/pid"; then
    step "vsftpd: start"
    ftp_cert "$BASE/ftp"
    printf '%s\n' listen=YES listen_address=127.0.0.1 "listen_port=$VSFTPD_PORT" background=NO \
      anonymous_enable=YES local_enable=NO no_anon_password=YES write_enable=YES anon_upload_enable=YES \
      anon_mkdir_write_enable=YES anon_other_write_enable=YES anon_umask=022 anon_world_readable_only=NO \
      "anon_root=$d/root" "secure_chroot_dir=$d/empty" pasv_min_port=40300 pasv_max_port=40399 \
      ssl_enable=YES allow_anon_ssl=YES force_anon_logins_ssl=YES force_anon_data_ssl=YES \
      require_ssl_reuse=YES "rsa_cert_file=$BASE/ftp/server.pem" "rsa_private_key_file=$BASE/ftp/server.key" \
      seccomp_sandbox=NO "vsftpd_log_file=$d/log" >"$d/config"
    setsid /usr/sbin/vsftpd "$d/config" </dev/null >>"$d/log" 2>&1 9>&- &
    echo $! >"$d/pid"
  fi
  wait_ready vsftpd "$d/log" "$d/pid" tcp_open "$VSFTPD_PORT"
}

write_env() {
  local tmp="$BASE/env.tmp.$$"
  cat >"$tmp" <<EOF
export TEST_MYSQL_URL=mysql://test:testpw@127.0.0.1:$MYSQL_PORT
export TEST_PG_URL=postgres://postgres:testpw@127.0.0.1:$PG_PORT/postgres
export TEST_MONGO_URL=mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true
export TEST_INFLUX_HTTP=http://127.0.0.1:$INFLUX_HTTP_PORT TEST_INFLUX_RPC=127.0.0.1:$INFLUX_RPC_PORT
export TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT TEST_S3_BUCKET=$S3_BUCKET AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK AWS_DEFAULT_REGION=us-east-1
export TEST_SSH="$SSH_USER@127.0.0.1 -p $SSH_PORT -i $BASE/ssh/id"
export TEST_MYSQL_SOCKET=$BASE/mysql/run/sock
export TEST_PG_SOCKET_DIR=$BASE/pg TEST_PG_CA=$BASE/pg/tls/ca.crt
export TEST_SSH_KEY=$BASE/ssh/id TEST_SSH_PORT=$SSH_PORT TEST_SSH_USER=$SSH_USER
export TEST_ANSIBLE_VENV=$TOOLS/ansible-venv
export TEST_FTP_HOST=127.0.0.1 TEST_FTP_PORT=$FTP_PORT TEST_FTPS_PORT=$FTPS_PORT TEST_FTP_USER=$FTP_USER TEST_FTP_READONLY_USER=$FTP_READONLY_USER TEST_FTP_PASSWORD=$FTP_PASSWORD
export TEST_FTP_CA=$BASE/ftp/ca.pem TEST_FTP_HOME=$BASE/ftp/home
export TEST_VSFTPD_PORT=$VSFTPD_PORT TEST_VSFTPD_ROOT=$BASE/vsftpd/root
export TEST_GARAGE_BIN=$TOOLS/bin/garage
EOF
  mv -f "$tmp" "$BASE/env"
}

# ---------------------------------------------------------------------------------------------
cmd_start() {
  [ "$(id -u)" = 0 ] || die "run as root (starts servers as the mysql/postgres users, adds user $SSH_USER)"
  mkdir -p "$BASE" "$TOOLS"; chmod 755 "$BASE"
  # one start/stop at a time; every server is started with 9>&- so that none inherits the lock
  exec 9>"$BASE/.lock"; flock 9
  install_packages
  install_python_tools
  install_s3_server
  install_ansible
  install_garage
  # The servers inherit this directory: not the checkout, which may be removed while they run
  # (pyftpdlib fails every CWD once its own working directory is gone).
  cd "$BASE"
  start_mariadb
  start_postgres
  start_mongo
  start_influx
  start_s3
  start_sshd
  start_ftp
  start_vsftpd
  write_env
  step "all services up; env: $BASE/env"
}

cmd_stop() {
  [ -d "$BASE" ] || { echo "nothing to stop ($BASE does not exist)"; return 0; }
  exec 9>"$BASE/.lock"; flock 9
  stop_pidfile sshd "$BASE/ssh/pid"
  stop_pidfile "ftp (pyftpdlib)" "$BASE/ftp/pid"
  stop_pidfile vsftpd "$BASE/vsftpd/pid"
  stop_pidfile "s3 (s3s-fs)" "$BASE/s3/pid"
  stop_pidfile influxdb "$BASE/influx/pid"
  stop_pidfile "mongo (nx-27017)" "$BASE/mongo.pid"
  if [ -f "$BASE/pg/data/PG_VERSION" ] && [ -x "$PG_BIN/pg_ctl" ] \
     && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$BASE/pg/data" status >/dev/null 2>&1; then
    echo "stopping postgres"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$BASE/pg/data" -m fast -w -t 30 stop >/dev/null \
      || echo "postgres did not stop cleanly; see $BASE/pg/log" >&2
  fi
  stop_pidfile mariadb "$BASE/mysql/server.pid"
  stop_pidfile mariadb "$BASE/mysql/run/pid"
  echo "stopped"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) echo "$BASE/env" ;;
  *) echo "usage: $0 [start|stop|env]" >&2; exit 2 ;;
esac
