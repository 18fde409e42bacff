#!/usr/bin/env bash
# `make h2`: realtime-lab behind nginx with TLS and HTTP/2, a self-signed certificate made on the
# spot. Serves https://127.0.0.1:$H2_PORT (HTTP/2) and https://127.0.0.1:$H1_PORT (HTTP/1.1, the
# same TLS) in front of `realtime-lab serve` on 127.0.0.1:$PORT, until Ctrl+C. Everything nginx
# writes (certificate, pid, logs, temp files) stays in $H2_DIR (.h2/). See docs/http2.md.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
PORT=${PORT:-8080}
H2_PORT=${H2_PORT:-8443}
H1_PORT=${H1_PORT:-8444}
DIR=${H2_DIR:-.h2}

# shellcheck source=deploy/nginx-lib.sh
. deploy/nginx-lib.sh
find_nginx
if ! "$nginx" -V 2>&1 | grep -q -- --with-http_v2_module; then
  echo "$nginx has no HTTP/2 module (--with-http_v2_module)" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "openssl is not installed" >&2; exit 1; }

mkdir -p "$DIR/temp"
DIR=$(cd "$DIR" && pwd)
if [ ! -s "$DIR/cert.pem" ] || ! openssl x509 -checkend 3600 -noout -in "$DIR/cert.pem" >/dev/null; then
  # A P-256 key and a certificate for localhost and 127.0.0.1, valid 30 days; browsers warn
  # (it is signed by nobody they trust): accept it once, or curl -k.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2>/dev/null
  chmod 600 "$DIR/key.pem"
fi
sed -e "s/127\.0\.0\.1:8080;/127.0.0.1:$PORT;/" \
    -e "s/listen 127\.0\.0\.1:8443 /listen 127.0.0.1:$H2_PORT /" \
    -e "s/listen 127\.0\.0\.1:8444 /listen 127.0.0.1:$H1_PORT /" \
    deploy/nginx-h2.conf >"$DIR/nginx.conf"
nginx_args "$DIR"

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop INT TERM EXIT
# --trusted-proxies: the app believes nginx's X-Forwarded-Proto (https), so the page's origin
# is https://... for its Origin checks, URLs say https:/wss:, and the session cookie is Secure.
"$BIN/realtime-lab" serve --host 127.0.0.1 --port "$PORT" --trusted-proxies 127.0.0.1 &
pids+=($!)
"$nginx" "${nginx_args[@]}" &
pids+=($!)
echo "HTTP/2:   https://127.0.0.1:$H2_PORT/   (curl -k --http2 https://127.0.0.1:$H2_PORT/api/config)"
echo "HTTP/1.1: https://127.0.0.1:$H1_PORT/   (the same page: open it in three tabs to see the six-connection limit)"
echo "self-signed certificate in $DIR/cert.pem: accept the browser's warning once; Ctrl+C stops both"
wait -n
