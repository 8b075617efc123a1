# Shared by scripts/up and scripts/test. Sourced, not run.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
mkdir -p "$LOCAL/run" "$LOCAL/logs"

STEP_NO=0
step() {
  STEP_NO=$((STEP_NO + 1))
  printf '\n\033[1;34m==> [%d] %s\033[0m\n' "$STEP_NO" "$*"
}
info() { printf '    %s\n' "$*"; }
warn() { printf '\033[1;33mwarning:\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1;31merror:\033[0m %s\n' "$*" >&2
  exit 1
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

APT_UPDATED=0
# Installs the Debian packages that are not installed yet; idempotent.
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    info "already installed: $*"
    return
  fi
  info "installing: ${missing[*]}"
  if [ "$APT_UPDATED" -eq 0 ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

mysql_answers() {
  mysqladmin --protocol=tcp -h127.0.0.1 -P3306 -uroot --connect-timeout=2 ping >/dev/null 2>&1
}

# MariaDB on 127.0.0.1:3306: used as is when something answers there,
# otherwise installed (Debian's package) and started with its data in .local/.
ensure_mariadb() {
  ensure_packages mariadb-client
  if mysql_answers; then
    info "MariaDB answers on 127.0.0.1:3306"
    return
  fi
  ensure_packages mariadb-server
  local datadir="$LOCAL/mariadb"
  if [ ! -d "$datadir/mysql" ]; then
    info "initialising a database in .local/mariadb"
    mariadb-install-db --user=root --datadir="$datadir" --auth-root-authentication-method=normal >"$LOCAL/logs/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed; see .local/logs/mariadb-install.log"
  fi
  info "starting MariaDB (data in .local/mariadb)"
  nohup mariadbd --user=root --datadir="$datadir" --bind-address=127.0.0.1 --port=3306 \
    --socket="$LOCAL/run/mariadb.sock" --pid-file="$LOCAL/run/mariadb.pid" \
    >"$LOCAL/logs/mariadb.log" 2>&1 &
  for _ in $(seq 1 60); do
    mysql_answers && { info "MariaDB is up"; return; }
    sleep 0.5
  done
  die "MariaDB did not start; see .local/logs/mariadb.log"
}

# Takes every permission of group and others away from PATH (a secret, or
# the directory holding secrets), leaving it MODE (600 or 700); says so when
# there were any, since what it holds may have been read. Idempotent.
close_to_others() {
  local path=$1 private=$2 mode
  mode=$(stat -c %a "$path")
  if [ $((8#$mode & 8#077)) -ne 0 ]; then
    chmod "$private" "$path"
    warn "$path was open to other users (mode $mode); now $private"
  fi
}

# A directory only this user may enter: created 0700, or closed to others.
private_dir() {
  mkdir -p -m 700 "$1"
  close_to_others "$1" 700
}

# Stops the process whose pid is in .local/run/NAME.pid, politely first.
stop_pidfile() {
  local name=$1 file="$LOCAL/run/$1.pid"
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    info "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Waits until URL answers 200, or fails naming the log to read.
wait_healthy() {
  local url=$1 log=$2 pid=$3
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "the process exited; see $log"; }
    sleep 0.2
  done
  tail -n 20 "$log" >&2
  die "$url did not answer in 60 s; see $log"
}

# ensure_local_ca and issue_local_cert: a local CA and its certificates.
source "$(dirname "${BASH_SOURCE[0]}")/tls.sh"

# The Jupyter venv, built from Debian's Python in a world-readable place so
# the unprivileged users that run notebooks can execute it.
VENV="${OPENCLOUD_VENV:-/opt/opencloud/venv}"
JUPYTER_PACKAGES=("jupyterlab==4.6.6" "jupyter-server==2.21.1" "ipykernel")
ensure_venv() {
  ensure_packages python3 python3-venv
  if [ -x "$VENV/bin/jupyter" ] && "$VENV/bin/jupyter" server --version >/dev/null 2>&1 \
     && "$VENV/bin/python" -c 'import jupyterlab, ipykernel' 2>/dev/null; then
    info "Jupyter venv ready at $VENV ($("$VENV/bin/jupyter" server --version))"
    return
  fi
  info "building the Jupyter venv at $VENV (JupyterLab, jupyter-server, ipykernel)"
  $SUDO mkdir -p "$(dirname "$VENV")"
  $SUDO /usr/bin/python3 -m venv "$VENV"
  $SUDO "$VENV/bin/pip" install -q --disable-pip-version-check "${JUPYTER_PACKAGES[@]}"
  $SUDO chmod -R a+rX "$VENV"
  info "Jupyter venv ready ($("$VENV/bin/jupyter" server --version))"
}
