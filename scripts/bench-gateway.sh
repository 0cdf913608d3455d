#!/usr/bin/env bash
# The loopback harness of micro-gateway: the same backend reached directly, through
# micro-gateway and through nginx, under wrk, taking turns in one run, then a table of
# requests/s and latency percentiles with the ratios. A manual benchmark, not a test.
#
#   scripts/bench-gateway.sh
#
# Settings (environment): THREADS (wrk threads, 1), CONNECTIONS (32), DURATION (10s),
# ROUNDS (3: each target is measured once per round, in turn), WARMUP (2s per target
# before the first round), PROXY_WORKERS (1: nginx worker processes and micro-gateway
# tokio worker threads), BACKEND_THREADS (1), REQUEST_PATH (/api/items/42).
# nginx and wrk are installed from Debian's packages when missing.
set -euo pipefail

THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
PROXY_WORKERS=${PROXY_WORKERS:-1}
BACKEND_THREADS=${BACKEND_THREADS:-1}
REQUEST_PATH=${REQUEST_PATH:-/api/items/42}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

need() {
    local tool=$1 package=$2
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "installing $package" >&2
        if [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
        else
            sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
        fi
    fi
}
need wrk wrk
need nginx nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "building micro-gateway and bench-backend (release)" >&2
cargo build --release --quiet -p micro-gateway --bin micro-gateway
cargo build --release --quiet -p micro-benches --bin bench-backend
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
GATEWAY_BIN=$target_dir/release/micro-gateway
BACKEND_BIN=$target_dir/release/bench-backend

work=$(mktemp -d /tmp/bench-gateway.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# A port nothing listens on (the harness is a script: it may pick ports, and checks).
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

# Waits until `url` answers 200, for at most 20 s.
wait_ok() {
    local url=$1 name=$2 deadline=$((SECONDS + 20))
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)" = 200 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$name did not answer 200 at $url; its log:" >&2
            cat "$work/$name.log" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

backend_port=$(free_port)
"$BACKEND_BIN" --listen "127.0.0.1:$backend_port" --threads "$BACKEND_THREADS" \
    >"$work/backend.log" 2>&1 &
pids+=($!)
wait_ok "http://127.0.0.1:$backend_port$REQUEST_PATH" backend

gateway_port=$(free_port)
cat >"$work/gateway.yaml" <<EOF
_format_version: "3.0"
services:
  - name: backend
    url: http://127.0.0.1:$backend_port
    routes:
      - name: api
        paths: [/api]
        strip_path: false
EOF
# The access log and per-request logging are off on both proxies.
RUST_LOG=warn TOKIO_WORKER_THREADS=$PROXY_WORKERS "$GATEWAY_BIN" \
    --config "$work/gateway.yaml" --listen "127.0.0.1:$gateway_port" --reload-interval 0s \
    >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_ok "http://127.0.0.1:$gateway_port$REQUEST_PATH" gateway

nginx_port=$(free_port)
mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes $PROXY_WORKERS;
pid $work/nginx/nginx.pid;
error_log $work/nginx.log warn;
events {
    worker_connections 1024;
}
http {
    access_log off;
    client_body_temp_path $work/nginx/client_body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    upstream backend {
        server 127.0.0.1:$backend_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$nginx_port;
        location /api {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
"$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx.out" 2>&1 &
pids+=($!)
wait_ok "http://127.0.0.1:$nginx_port$REQUEST_PATH" nginx

declare -A url=(
    [direct]="http://127.0.0.1:$backend_port$REQUEST_PATH"
    [micro-gateway]="http://127.0.0.1:$gateway_port$REQUEST_PATH"
    [nginx]="http://127.0.0.1:$nginx_port$REQUEST_PATH"
)
targets=(direct micro-gateway nginx)

# One wrk run; prints "rps p50 p90 p99" (latencies in ms) and fails on errors.
measure() {
    local target=$1 duration=$2 out
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency "${url[$target]}")
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
        echo "$target: wrk saw errors:" >&2
        echo "$out" >&2
        exit 1
    fi
    awk '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return v
        }
        $1 == "Requests/sec:" { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "90%" { p90 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        END { printf "%.0f %.3f %.3f %.3f\n", rps, p50, p90, p99 }
    ' <<<"$out"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS rounds; proxies with $PROXY_WORKERS worker(s), backend with $BACKEND_THREADS thread(s); $(nproc) cpus" >&2
for target in "${targets[@]}"; do
    measure "$target" "$WARMUP" >/dev/null
done
results=$work/results
for round in $(seq 1 "$ROUNDS"); do
    for target in "${targets[@]}"; do
        line=$(measure "$target" "$DURATION")
        echo "round $round  $target  $line" >&2
        echo "$target $line" >>"$results"
    done
done

# The median of the rounds for each column, then the ratios of the medians.
awk -v rounds="$ROUNDS" '
    function median(list, n,    i, j, t, a) {
        split(list, a, " ")
        for (i = 1; i <= n; i++)
            for (j = i + 1; j <= n; j++)
                if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { for (c = 2; c <= 5; c++) col[$1, c] = col[$1, c] " " $c }
    END {
        split("direct micro-gateway nginx", names, " ")
        printf "\n%-14s %10s %9s %9s %9s\n", "target", "req/s", "p50 ms", "p90 ms", "p99 ms"
        for (i = 1; i <= 3; i++) {
            t = names[i]
            for (c = 2; c <= 5; c++) m[t, c] = median(col[t, c], rounds)
            printf "%-14s %10.0f %9.3f %9.3f %9.3f\n", t, m[t, 2], m[t, 3], m[t, 4], m[t, 5]
        }
        printf "\nmedians of %d rounds\n", rounds
        printf "micro-gateway / nginx:  req/s %.2f  p50 %.2f  p99 %.2f\n",
            m["micro-gateway", 2] / m["nginx", 2], m["micro-gateway", 3] / m["nginx", 3],
            m["micro-gateway", 5] / m["nginx", 5]
        printf "micro-gateway / direct: req/s %.2f  p50 %.2f  p99 %.2f\n",
            m["micro-gateway", 2] / m["direct", 2], m["micro-gateway", 3] / m["direct", 3],
            m["micro-gateway", 5] / m["direct", 5]
        printf "nginx / direct:         req/s %.2f  p50 %.2f  p99 %.2f\n",
            m["nginx", 2] / m["direct", 2], m["nginx", 3] / m["direct", 3],
            m["nginx", 5] / m["direct", 5]
    }
' "$results"
