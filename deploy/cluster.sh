#!/usr/bin/env bash
# `make cluster`: the deployment of "Scaling out" on one machine. A private redis-server on
# 127.0.0.1:$REDIS_PORT (no persistence), two `realtime-lab serve --bus redis://...` processes on
# $PORT1 and $PORT2, and nginx on http://127.0.0.1:$PORT in front of both (deploy/nginx-cluster.conf:
# the README's "Behind nginx" blocks with an upstream of the two), until Ctrl+C or SIGTERM.
# Everything they write (Redis data, nginx pid, logs, temp files) stays in $CLUSTER_DIR: a fresh
# temporary directory, removed at the end, unless you name one (then it is kept).
# $SERVE_ARGS goes to both processes (e.g. SERVE_ARGS=--chaos for the dashboard's fault buttons).
# A server process that dies is reported and the other carries on (nginx skips the dead one);
# when nginx or Redis exits, everything stops.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
PORT=${PORT:-8080}
PORT1=${PORT1:-8081}
PORT2=${PORT2:-8082}
REDIS_PORT=${REDIS_PORT:-6390}
SERVE_ARGS=${SERVE_ARGS:-}

[ "$REDIS_PORT" != 6379 ] || { echo "REDIS_PORT=6379 is the shared Redis: pick another" >&2; exit 1; }
# shellcheck source=deploy/nginx-lib.sh
. deploy/nginx-lib.sh
find_nginx
redis=$(command -v redis-server || true)
[ -n "$redis" ] || { echo "redis-server is not installed (Debian: apt-get install redis-server)" >&2; exit 1; }

keep=1
if [ -z "${CLUSTER_DIR:-}" ]; then
  CLUSTER_DIR=$(mktemp -d "${TMPDIR:-/tmp}/realtime-lab-cluster.XXXXXX")
  keep=0
fi
mkdir -p "$CLUSTER_DIR/temp" "$CLUSTER_DIR/redis"
DIR=$(cd "$CLUSTER_DIR" && pwd)

sed -e "s/server 127\.0\.0\.1:8081;/server 127.0.0.1:$PORT1;/" \
    -e "s/server 127\.0\.0\.1:8082;/server 127.0.0.1:$PORT2;/" \
    -e "s/listen 127\.0\.0\.1:8080;/listen 127.0.0.1:$PORT;/" \
    deploy/nginx-cluster.conf >"$DIR/nginx.conf"
nginx_args "$DIR"

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
  [ "$keep" = 1 ] || rm -rf "$DIR"
  exit "${1:-0}"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop $?' EXIT

# Wait (at most 20 s) until $1 succeeds; $2 says what for.
wait_for() {
  for _ in $(seq 200); do
    if eval "$1" 2>/dev/null; then return 0; fi
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "$2: a process exited" >&2; return 1; }; done
    sleep 0.1  # polling a starting process, bounded by the loop
  done
  echo "$2: not ready within 20 s" >&2
  return 1
}
redis_ping() {
  local reply=
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 && read -r -t 1 reply <&3
  exec 3>&-
  [[ $reply == +PONG* ]]
}
health() {
  "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
    "http://127.0.0.1:$1/api/health"
}

"$redis" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR/redis" \
  --logfile "$DIR/redis.log" &
redis_pid=$!
pids+=("$redis_pid")
wait_for redis_ping "redis-server on 127.0.0.1:$REDIS_PORT (see $DIR/redis.log)"

BUS="redis://127.0.0.1:$REDIS_PORT/0"
servers=()
for port in "$PORT1" "$PORT2"; do
  # shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
  "$BIN/realtime-lab" serve --host 127.0.0.1 --port "$port" --bus "$BUS" $SERVE_ARGS \
    >>"$DIR/serve-$port.log" 2>&1 &
  pids+=($!)
  servers+=($!)
done
wait_for "health $PORT1 && health $PORT2" "realtime-lab on $PORT1 and $PORT2 (see $DIR/serve-*.log)"
"$nginx" "${nginx_args[@]}" &
nginx_pid=$!
pids+=("$nginx_pid")

echo "dashboard: http://127.0.0.1:$PORT/   (nginx, round robin over both processes)"
echo "processes: http://127.0.0.1:$PORT1/ (pid ${servers[0]}) and http://127.0.0.1:$PORT2/ (pid ${servers[1]}), bus $BUS (pid $redis_pid)"
echo "logs in $DIR; Ctrl+C stops everything"

left=2
while :; do
  exited=
  wait -n -p exited "${pids[@]}" || true
  if [ "$exited" = "$nginx_pid" ] || [ "$exited" = "$redis_pid" ]; then
    echo "$([ "$exited" = "$nginx_pid" ] && echo nginx || echo redis-server) exited: stopping" >&2
    stop 1
  fi
  left=$((left - 1))
  echo "realtime-lab (pid $exited) exited; nginx sends everything to the other" >&2
  [ "$left" -gt 0 ] || stop 1
  kept=()
  for pid in "${pids[@]}"; do [ "$pid" = "$exited" ] || kept+=("$pid"); done
  pids=("${kept[@]}")
done
