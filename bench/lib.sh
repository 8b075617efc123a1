# Shared by bench/proxy, bench/websocket and bench/routes. Sourced, not run.
# shellcheck shell=bash

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
RELEASE="$ROOT/target/release"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/oc-bench.XXXXXX")"
MYSQL_ARGS=(--protocol=tcp -h127.0.0.1 -P3306 -uroot)

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-64}"

# CPU 1 for the process under test, CPU 0 for the load generator and for
# everything else (upstream, control), when the machine has two cores.
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  ON_LOAD=(taskset -c 0)
  ON_TEST=(taskset -c 1)
  PINNED=1
else
  ON_LOAD=()
  ON_TEST=()
  PINNED=0
fi

STARTED_PIDS=()
DATABASES=()
# A command the proxies under test start under (bench/proxy's CALLGRIND=1).
UNDER_CALLGRIND=()

progress() { printf '\033[1;34m[bench %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
info() { progress "$*"; }
# shellcheck source=../scripts/tls.sh
source "$ROOT/scripts/tls.sh"

# With TLS=1 the gateway (and the proxies that support it) serve https with
# ECDSA P-256 certificates from a CA made in $TMP/tls.
TLS="${TLS:-0}"
SCHEME=http
[ "$TLS" = 1 ] && SCHEME=https

# make_certificates: $TLS_DIR with ca.pem, platform.pem/.key (localhost)
# and sessions.pem/.key (*.nb.localhost).
make_certificates() {
  TLS_DIR="$TMP/tls"
  mkdir -p -m 700 "$TLS_DIR"
  ensure_packages openssl
  ensure_local_ca "$TLS_DIR"
  issue_local_cert "$TLS_DIR" platform localhost
  issue_local_cert "$TLS_DIR" sessions "*.nb.localhost"
}
die() {
  printf '\033[1;31m[bench] error:\033[0m %s\n' "$*" >&2
  exit 1
}

# Stops everything this script started (each in its own process group),
# drops the databases it created and removes its temp dir.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i pid
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${STARTED_PIDS[$i]}
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]}"; do
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  for db in "${DATABASES[@]}"; do
    mysql "${MYSQL_ARGS[@]}" -e "DROP DATABASE IF EXISTS \`$db\`" 2>/dev/null || true
  done
  if [ "${KEEP_TMP:-0}" = 1 ]; then
    progress "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Installs the Debian packages that are missing; idempotent.
ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  progress "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The workspace's release binaries (skip with SKIP_BUILD=1).
build_release() {
  if [ "${SKIP_BUILD:-0}" = 1 ]; then
    progress "SKIP_BUILD=1: using the binaries in target/release"
  else
    # What Pingora's build needs, as scripts/up installs it on a fresh machine.
    ensure_packages build-essential cmake pkg-config
    progress "cargo build --release --bins (waits for other cargo runs)"
    (cd "$ROOT" && cargo build --release --bins) >&2 || die "release build failed"
  fi
  local bin
  for bin in "$@"; do
    [ -x "$RELEASE/$bin" ] || die "$RELEASE/$bin is missing"
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  local port=$1 what=$2 tries=${3:-300}
  for _ in $(seq 1 "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$what did not listen on $port; see $TMP/*.log"
}

# start NAME COMMAND...: runs COMMAND in its own process group (so cleanup
# ends it and its children), output in $TMP/NAME.log. Sets LAST_PID.
start() {
  local name=$1
  shift
  setsid "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
}

# stop PID: ends one process group started with `start`.
stop() {
  local pid=$1 i
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for i in "${!STARTED_PIDS[@]}"; do
    [ "${STARTED_PIDS[$i]}" = "$pid" ] && unset 'STARTED_PIDS[i]'
  done
  STARTED_PIDS=("${STARTED_PIDS[@]}")
}

# pin CPU PID: moves every thread of every process in PID's group to CPU.
pin() {
  [ "$PINNED" = 1 ] || return 0
  local cpu=$1 pgid=$2 p
  for p in $(pgrep -g "$pgid"); do
    taskset -a -p -c "$cpu" "$p" >/dev/null
  done
}

# VmRSS of PID in MiB.
rss_mib() {
  awk '/^VmRSS:/ {printf "%.0f", $2/1024}' "/proc/$1/status"
}

# --- nginx ---------------------------------------------------------------

# nginx_conf NAME HTTP_BLOCK: a one-worker nginx config in $TMP/NAME.
nginx_conf() {
  local name=$1 body=$2 dir="$TMP/$1"
  mkdir -p "$dir/tmp"
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
$body
}
EOF
  echo "$dir/nginx.conf"
}

# start_nginx NAME CONF PORT [CPU...]: Sets LAST_PID.
start_nginx() {
  local name=$1 conf=$2 port=$3
  shift 3
  start "$name" "$@" nginx -p "$TMP/$name" -c "$conf" -e "$TMP/$name/error.log"
  wait_port "$port" "nginx $name"
}

# --- wrk -----------------------------------------------------------------

# wrk_once URL [WRK ARGS...]: one round; prints `rps p50_ms p99_ms bad`,
# where bad counts non-2xx/3xx answers and socket errors.
wrk_once() {
  local url=$1
  shift
  local out
  out=$("${ON_LOAD[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@" "$url") || die "wrk failed: $out"
  echo "$out" >>"$TMP/wrk.log"
  awk '
    function ms(v) {
      if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
      if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
      if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
      return v
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { bad += $NF }
    /Socket errors:/ { gsub(/,/, ""); bad += $4 + $6 + $8 + $10 }
    END { printf "%.0f %.3f %.3f %d\n", rps, p50, p99, bad }
  ' <<<"$out"
}

# wrk_median URL [WRK ARGS...]: a short warm-up, then ROUNDS rounds; prints
# the round with the median requests/s (`rps p50_ms p99_ms bad`).
wrk_median() {
  local url=$1
  shift
  local rounds=() r line
  DURATION=2 wrk_once "$url" "$@" >/dev/null
  for r in $(seq 1 "$ROUNDS"); do
    line=$(wrk_once "$url" "$@")
    progress "  round $r: $(awk '{printf "%s req/s, p50 %s ms, p99 %s ms", $1, $2, $3}' <<<"$line")"
    rounds+=("$line")
  done
  printf '%s\n' "${rounds[@]}" | sort -n -k1,1 | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2)'
}

# --- control and gateway -------------------------------------------------

GATEWAY_KEY="bench-gateway-key-0123456789abcdefghijklmnop"

# start_control [PINNING COMMAND...]: a fresh database and control on it,
# run under the given command (`"${ON_LOAD[@]}"`, or none), with pool_max
# CONTROL_POOL_MAX (4). Its config is in $TMP/stack. Sets GW_PORT (the
# public_url's port, for a gateway), CONTROL_PUBLIC, CONTROL_INTERNAL,
# CONTROL_PID and DB_URL.
start_control() {
  local db="oc_bench_$$"
  mysql "${MYSQL_ARGS[@]}" -e "SELECT 1" >/dev/null 2>&1 || die "no MariaDB answers on 127.0.0.1:3306 (root, no password)"
  progress "database $db"
  mysql "${MYSQL_ARGS[@]}" -e "CREATE DATABASE \`$db\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
  DATABASES+=("$db")
  DB_URL="mysql://root@127.0.0.1:3306/$db"
  GW_PORT=$(free_port)
  local cp ci dir="$TMP/stack"
  cp=$(free_port)
  ci=$(free_port)
  mkdir -p "$dir/state"
  # Control and the gateway refuse a keys file others can read.
  (umask 077 && "$RELEASE/opencloud-control" keygen >"$dir/keys.toml")
  cat >"$dir/control.toml" <<EOF
public_url = "$SCHEME://localhost:$GW_PORT"
keys_file = "keys.toml"
trusted_proxies = ["127.0.0.1"]
# Hosts here are on loopback (the agent in bench/open, stand-ins elsewhere).
allow_private_hosts = true
session_domain = "nb.localhost:$GW_PORT"
gateway_keys = ["$GATEWAY_KEY"]
[listen]
public = "127.0.0.1:$cp"
internal = "127.0.0.1:$ci"
[database]
url = "$DB_URL"
pool_min = 1
pool_max = ${CONTROL_POOL_MAX:-4}
EOF
  progress "control on :$cp, internal :$ci"
  RUST_LOG=warn start control "$@" "$RELEASE/opencloud-control" --config "$dir/control.toml"
  CONTROL_PID=$LAST_PID
  CONTROL_PUBLIC="127.0.0.1:$cp"
  CONTROL_INTERNAL="127.0.0.1:$ci"
  wait_port "$cp" control 600
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$cp/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$cp/healthz" >/dev/null || die "control is not healthy; see $TMP/control.log"
}

# start_stack: a fresh database, control (CPU 0) and the gateway (pinned to
# the test CPU) in front of it. Sets GW_PORT, GW_PID, DB_URL.
start_stack() {
  start_control "${ON_LOAD[@]}"
  local gm dir="$TMP/stack"
  gm=$(free_port)
  local tls_section=""
  if [ "$TLS" = 1 ]; then
    [ -n "${TLS_DIR:-}" ] || make_certificates
    tls_section="[tls]
cert = \"$TLS_DIR/platform.pem\"
key = \"$TLS_DIR/platform.key\"
session_cert = \"$TLS_DIR/sessions.pem\"
session_key = \"$TLS_DIR/sessions.key\""
  fi
  cat >"$dir/gateway.toml" <<EOF
name = "bench-gateway"
public_url = "$SCHEME://localhost:$GW_PORT"
session_domain = "nb.localhost:$GW_PORT"
keys_file = "keys.toml"
state_dir = "state"
[listen]
public = "127.0.0.1:$GW_PORT"
metrics = "127.0.0.1:$gm"
[control]
public = "$CONTROL_PUBLIC"
internal_url = "http://$CONTROL_INTERNAL"
gateway_key = "$GATEWAY_KEY"
$tls_section
EOF
  progress "gateway (CPU 1) on :$GW_PORT"
  RUST_LOG=warn start gateway "${ON_TEST[@]}" "${UNDER_CALLGRIND[@]}" "$RELEASE/opencloud-gateway" --config "$dir/gateway.toml"
  GW_PID=$LAST_PID
  wait_port "$GW_PORT" gateway
}

# gateway_session UPSTREAM_PORT [http|websocket]: a user, a project and a
# session at 127.0.0.1:UPSTREAM_PORT, entered; sets SID, SESSION_HOST, COOKIE.
# The session's host is a stand-in whose host link (the agent's own link
# code) runs inside `oc-bench session` (CPU 0, beside the upstream, as the
# agent runs beside its sessions): it stays in the background until cleanup,
# and the gateway reaches the upstream through it.
gateway_session() {
  local log="$TMP/session.log" pid
  local tls_ca=()
  [ "$TLS" = 1 ] && tls_ca=(--tls-ca "$TLS_DIR/ca.pem")
  start session "${ON_LOAD[@]}" "$RELEASE/oc-bench" session --db-url "$DB_URL" --gateway "127.0.0.1:$GW_PORT" \
    --upstream-port "$1" --upstream-kind "${2:-http}" --ca-dir "$TMP/stack" "${tls_ca[@]}"
  pid=$LAST_PID
  # COOKIE= is the last line it prints.
  for _ in $(seq 1 600); do
    grep -q '^COOKIE=' "$log" && break
    kill -0 "$pid" 2>/dev/null || die "session set-up failed: $(cat "$log")"
    sleep 0.1
  done
  SID=$(sed -n 's/^SID=//p' "$log")
  SESSION_HOST=$(sed -n 's/^HOST=//p' "$log")
  COOKIE=$(sed -n 's/^COOKIE=//p' "$log")
  [ -n "$COOKIE" ] || die "no session cookie: $(cat "$log")"
  progress "session $SID entered (cookie ${#COOKIE} bytes) through host link $(sed -n 's/^LINK=//p' "$log")"
}

# ratio A B: A/B with two decimals.
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
}
