#!/usr/bin/env bash
# The whole fedlora test suite: formatting, lints, then every unit and integration test against a
# real PostgreSQL. PostgreSQL is found, in order, from DATABASE_URL, from a server on
# 127.0.0.1:5432, or by starting a throwaway cluster (initdb/pg_ctl) that is removed afterwards.
# A missing PostgreSQL is an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_tmp=""
cleanup() {
  if [ -n "$pg_tmp" ]; then
    as_pg_owner pg_ctl -D "$pg_tmp/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$pg_tmp"
  fi
}
trap cleanup EXIT

# PostgreSQL refuses to run as root: run its tools as the 'postgres' (or 'nobody') user then.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then
    local owner=postgres
    id "$owner" >/dev/null 2>&1 || owner=nobody
    runuser -u "$owner" -- env PATH="$PATH" "$@"
  else
    "$@"
  fi
}

find_pg_bin() {
  local tool=$1
  command -v "$tool" 2>/dev/null && return 0
  ls /usr/lib/postgresql/*/bin/"$tool" 2>/dev/null | sort -V | tail -n 1
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if [ -n "${DATABASE_URL:-}" ]; then
  echo "test: using PostgreSQL from DATABASE_URL"
elif port_open 127.0.0.1 5432; then
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
  echo "test: using the PostgreSQL server on 127.0.0.1:5432"
else
  initdb_bin=$(find_pg_bin initdb || true)
  pg_ctl_bin=$(find_pg_bin pg_ctl || true)
  if [ -z "$initdb_bin" ] || [ -z "$pg_ctl_bin" ]; then
    echo "test: error: no PostgreSQL. Set DATABASE_URL, start a server on 127.0.0.1:5432, or install" >&2
    echo "test: PostgreSQL's server tools (Debian/Ubuntu: apt-get install postgresql)." >&2
    exit 1
  fi
  PATH="$(dirname "$initdb_bin"):$(dirname "$pg_ctl_bin"):$PATH"
  pg_tmp=$(mktemp -d)
  port=$(( 20000 + RANDOM % 20000 ))
  [ "$(id -u)" = 0 ] && chown "$(id -u postgres 2>/dev/null || id -u nobody)" "$pg_tmp"
  as_pg_owner initdb -D "$pg_tmp/data" -A trust -U postgres >/dev/null
  as_pg_owner pg_ctl -D "$pg_tmp/data" -l "$pg_tmp/log" -w \
    -o "-p $port -k $pg_tmp -c listen_addresses=127.0.0.1" start >/dev/null
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "test: started a throwaway PostgreSQL cluster on port $port"
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
