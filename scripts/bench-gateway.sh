#!/usr/bin/env bash
# The loopback harness of micro-gateway: the same backend reached directly, through
# micro-gateway, nginx and HAProxy, under wrk, taking turns in one run; then a table of
# requests/s, latency percentiles and CPU per request of each proxy, with the ratios.
# A manual benchmark, not a test.
#
#   scripts/bench-gateway.sh                 # wrk, CPU from /proc, load guard
#   MODE=callgrind scripts/bench-gateway.sh  # instructions per request under valgrind
#
# Two scenarios, each proxy with one worker:
# - plain: route `/api` to the backend (direct, micro-gateway, nginx, haproxy);
# - auth: the same route with a JWT (HS256) check and a rate-limit check per request
#   (micro-gateway's `jwt` + `rate-limiting` plugins; HAProxy's `jwt_verify` and a
#   stick table); both are first checked to refuse a missing, a bad and an expired token.
#
# Settings (environment): THREADS (wrk threads, 1), CONNECTIONS (32), DURATION (10s),
# ROUNDS (3: each target is measured once per round, in turn), WARMUP (2s per target
# before the first round), PROXY_WORKERS (1: nginx worker processes, HAProxy threads,
# micro-gateway tokio worker threads), GATEWAY_FLAVOR (multi-thread, or current-thread
# for micro-gateway's `--runtime current-thread --workers $PROXY_WORKERS`), BACKEND_THREADS (1), REQUEST_PATH
# (/api/items/42), SCENARIOS ("plain auth"), MAX_OTHER_CPU (0.10: a round during which
# processes other than the ones measured used more than this share of the machine's
# CPUs is measured again, up to RETRIES (3) times, then counted but marked `busy`),
# MODE (wrk or callgrind), CALLGRIND_DURATION (20s), GATEWAY_BIN (a micro-gateway
# binary to measure instead of building this tree's, e.g. an earlier version's),
# BACKEND_BIN (likewise for bench-backend), BASELINE_BIN (an earlier micro-gateway
# binary measured in the same rounds as `micro-gateway-before`, for before/after ratios).
# nginx, HAProxy, wrk and valgrind are installed from Debian's packages when missing.
set -euo pipefail

THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
PROXY_WORKERS=${PROXY_WORKERS:-1}
GATEWAY_FLAVOR=${GATEWAY_FLAVOR:-multi-thread}
BACKEND_THREADS=${BACKEND_THREADS:-1}
REQUEST_PATH=${REQUEST_PATH:-/api/items/42}
SCENARIOS=${SCENARIOS:-plain auth}
MAX_OTHER_CPU=${MAX_OTHER_CPU:-0.10}
RETRIES=${RETRIES:-3}
MODE=${MODE:-wrk}
CALLGRIND_DURATION=${CALLGRIND_DURATION:-20s}
JWT_SECRET=bench-secret-of-at-least-32-bytes!!

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
need haproxy haproxy
need openssl openssl
[ "$MODE" = callgrind ] && need valgrind valgrind
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

echo "building micro-gateway and bench-backend (release)" >&2
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [ -z "${GATEWAY_BIN:-}" ]; then
    cargo build --release --quiet -p micro-gateway --bin micro-gateway
    GATEWAY_BIN=$target_dir/release/micro-gateway
fi
if [ -z "${BACKEND_BIN:-}" ]; then
    cargo build --release --quiet -p micro-benches --bin bench-backend
    BACKEND_BIN=$target_dir/release/bench-backend
fi

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

# Sets `port` to one nothing listens on, not handed out before and below the ephemeral
# range (where the kernel picks the ports of outgoing connections; the harness is a
# script: it may pick ports, and checks). Called in this shell, not in `$(...)`, whose
# copy of RANDOM would repeat the same number.
taken=" "
pick_port() {
    while :; do
        port=$((20000 + RANDOM % 12000))
        if [[ $taken != *" $port "* ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            taken+="$port "
            return
        fi
    done
}

# The status `url` answers (with an optional Authorization header).
status_of() {
    local url=$1 auth=${2:-}
    if [ -n "$auth" ]; then
        curl -s -o /dev/null -w '%{http_code}' -H "Authorization: $auth" "$url" || true
    else
        curl -s -o /dev/null -w '%{http_code}' "$url" || true
    fi
}

# Waits until `url` answers 200, for at most 60 s (valgrind starts slowly).
wait_ok() {
    local url=$1 name=$2 auth=${3:-} deadline=$((SECONDS + 60))
    until [ "$(status_of "$url" "$auth")" = 200 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$name did not answer 200 at $url; its log:" >&2
            cat "$work/$name.log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

# An HS256 JWT for `iss: bench`, expiring at `exp`.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
jwt() {
    local exp=$1 secret=${2:-$JWT_SECRET} header payload signature
    header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
    payload=$(printf '{"iss":"bench","sub":"client-1","exp":%s}' "$exp" | b64url)
    signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -hmac "$secret" -binary | b64url)
    printf '%s.%s.%s' "$header" "$payload" "$signature"
}
TOKEN=$(jwt $(($(date +%s) + 86400)))
EXPIRED=$(jwt $(($(date +%s) - 3600)))
FORGED=$(jwt $(($(date +%s) + 86400)) wrong-secret-wrong-secret-wrong-secret)

# Under callgrind each proxy runs as a single process with instrumentation off until
# the measured window.
wrap() {
    local name=$1
    shift
    # `exec`: started in the background, the proxy then has the pid `$!` gives.
    if [ "$MODE" = callgrind ]; then
        exec valgrind --tool=callgrind --instr-atstart=no \
            --callgrind-out-file="$work/callgrind.$name.%p" "$@"
    else
        exec "$@"
    fi
}

pick_port
backend_port=$port
"$BACKEND_BIN" --listen "127.0.0.1:$backend_port" --threads "$BACKEND_THREADS" \
    >"$work/backend.log" 2>&1 &
pids+=($!)
backend_pid=$!
wait_ok "http://127.0.0.1:$backend_port$REQUEST_PATH" backend

declare -A url=() pid_of=() auth_of=()
url[direct]="http://127.0.0.1:$backend_port$REQUEST_PATH"
pid_of[direct]=$backend_pid

gateway_file() {
    local auth=$1
    cat <<EOF
_format_version: "3.0"
services:
  - name: backend
    url: http://127.0.0.1:$backend_port
    routes:
      - name: api
        paths: [/api]
        strip_path: false
EOF
    if [ "$auth" = auth ]; then
        cat <<EOF
    plugins:
      - name: jwt
        config:
          keys:
            - key: bench
              algorithm: HS256
              secret: "$JWT_SECRET"
      - name: rate-limiting
        config:
          second: 100000000
          limit_by: ip
          hide_client_headers: true
EOF
    fi
}

start_gateway() {
    local name=$1 auth=$2 bin=${3:-$GATEWAY_BIN}
    pick_port
    gateway_file "$auth" >"$work/$name.yaml"
    local runtime=()
    [ "$GATEWAY_FLAVOR" != multi-thread ] && [ "$bin" = "$GATEWAY_BIN" ] &&
        runtime=(--runtime "$GATEWAY_FLAVOR" --workers "$PROXY_WORKERS")
    # The access log and per-request logging are off on every proxy.
    RUST_LOG=warn TOKIO_WORKER_THREADS=$PROXY_WORKERS wrap "$name" "$bin" \
        --config "$work/$name.yaml" --listen "127.0.0.1:$port" --reload-interval 0s \
        "${runtime[@]}" >"$work/$name.log" 2>&1 &
    pids+=($!)
    pid_of[$name]=$!
    url[$name]="http://127.0.0.1:$port$REQUEST_PATH"
}

start_nginx() {
    pick_port
    mkdir -p "$work/nginx"
    local master=on
    [ "$MODE" = callgrind ] && master=off
    cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
master_process $master;
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
        listen 127.0.0.1:$port;
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
    wrap nginx "$NGINX" -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx.out" 2>&1 &
    pids+=($!)
    pid_of[nginx]=$!
    url[nginx]="http://127.0.0.1:$port$REQUEST_PATH"
}

start_haproxy() {
    local name=$1 auth=$2
    pick_port
    {
        cat <<EOF
global
    nbthread $PROXY_WORKERS
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option forwardfor
frontend fe
    bind 127.0.0.1:$port
EOF
        if [ "$auth" = auth ]; then
            cat <<EOF
    stick-table type ip size 100k expire 10s store http_req_rate(1s)
    http-request set-var(txn.bearer) http_auth_bearer
    http-request deny deny_status 401 unless { var(txn.bearer) -m found }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_header_query('\$.alg') -m str HS256 }
    http-request deny deny_status 401 unless { var(txn.bearer),jwt_verify("HS256","$JWT_SECRET") -m int 1 }
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
    http-request deny deny_status 401 if { date,neg,add(txn.exp) -m int lt 0 }
    http-request track-sc0 src
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 100000000 }
EOF
        fi
        cat <<EOF
    use_backend be if { path_beg /api }
backend be
    http-reuse always
    server s1 127.0.0.1:$backend_port
EOF
    } >"$work/$name.cfg"
    wrap "$name" "$HAPROXY" -db -f "$work/$name.cfg" >"$work/$name.log" 2>&1 &
    pids+=($!)
    pid_of[$name]=$!
    url[$name]="http://127.0.0.1:$port$REQUEST_PATH"
}

targets=()
for scenario in $SCENARIOS; do
    case $scenario in
        plain)
            start_gateway micro-gateway plain
            start_nginx
            start_haproxy haproxy plain
            targets+=(direct micro-gateway nginx haproxy)
            if [ -n "${BASELINE_BIN:-}" ]; then
                start_gateway micro-gateway-before plain "$BASELINE_BIN"
                targets+=(micro-gateway-before)
            fi
            ;;
        auth)
            start_gateway micro-gateway-auth auth
            start_haproxy haproxy-auth auth
            auth_of[micro-gateway-auth]="Bearer $TOKEN"
            auth_of[haproxy-auth]="Bearer $TOKEN"
            targets+=(micro-gateway-auth haproxy-auth)
            if [ -n "${BASELINE_BIN:-}" ]; then
                start_gateway micro-gateway-auth-before auth "$BASELINE_BIN"
                auth_of[micro-gateway-auth-before]="Bearer $TOKEN"
                targets+=(micro-gateway-auth-before)
            fi
            ;;
        *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
done
for target in "${targets[@]}"; do
    wait_ok "${url[$target]}" "$target" "${auth_of[$target]:-}"
done

# Both JWT targets refuse a missing, a forged and an expired token before anything is
# measured.
for target in micro-gateway-auth haproxy-auth micro-gateway-auth-before; do
    [ -n "${auth_of[$target]:-}" ] || continue
    for bad in "" "Bearer $FORGED" "Bearer $EXPIRED"; do
        got=$(status_of "${url[$target]}" "$bad")
        if [ "$got" != 401 ]; then
            echo "$target answered $got, not 401, to the token '${bad:-none}'" >&2
            exit 1
        fi
    done
done

# CPU time (clock ticks) of a process and its children's threads, from /proc.
ticks_of() {
    local pid=$1 total=0 p
    for p in $pid $(pgrep -P "$pid" || true); do
        if [ -r "/proc/$p/stat" ]; then
            total=$((total + $(awk '{ print $14 + $15 }' "/proc/$p/stat")))
        fi
    done
    echo "$total"
}
# Busy clock ticks of the whole machine, from /proc/stat.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

run_wrk() {
    local target=$1 duration=$2
    local header=()
    [ -n "${auth_of[$target]:-}" ] && header=(-H "Authorization: ${auth_of[$target]}")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency "${header[@]}" "${url[$target]}"
}

# One wrk run; prints "rps p50 p90 p99 cpu_us_per_request other_cpu_share" (latencies
# in ms) and fails on errors.
measure() {
    local target=$1 duration=$2 out pid=${pid_of[$1]}
    local p0 b0 m0 p1 b1 m1 wrk_ticks
    p0=$(ticks_of "$pid"); b0=$(ticks_of "$backend_pid"); m0=$(machine_ticks)
    # wrk's time shows in this shell's cutime + cstime once it has been waited for.
    local self=$BASHPID wrk_before
    wrk_before=$(awk '{ print $16 + $17 }' "/proc/$self/stat")
    out=$(run_wrk "$target" "$duration")
    p1=$(ticks_of "$pid"); b1=$(ticks_of "$backend_pid"); m1=$(machine_ticks)
    wrk_ticks=$(($(awk '{ print $16 + $17 }' "/proc/$self/stat") - wrk_before))
    if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
        echo "$target: wrk saw errors:" >&2
        echo "$out" >&2
        exit 1
    fi
    local proxy_ticks=$((p1 - p0)) backend_ticks=$((b1 - b0)) machine=$((m1 - m0))
    [ "$target" = direct ] && backend_ticks=0
    awk -v proxy="$proxy_ticks" -v backend="$backend_ticks" -v wrkt="$wrk_ticks" \
        -v machine="$machine" -v hz="$HZ" -v ncpu="$NCPU" '
        function ms(v) {
            if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000
            if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0
            if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000
            return v
        }
        $2 == "requests" && $3 == "in" { requests = $1; secs = $4 + 0 }
        $1 == "Requests/sec:" { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "90%" { p90 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        END {
            other = (machine - proxy - backend - wrkt) / (secs * hz * ncpu)
            if (other < 0) other = 0
            printf "%.0f %.3f %.3f %.3f %.2f %.3f\n", rps, p50, p90, p99,
                proxy / hz / requests * 1e6, other
        }
    ' <<<"$out"
}

if [ "$MODE" = callgrind ]; then
    # Instructions per request: instrumentation on for one wrk window, dumped after it.
    printf "\n%-26s %10s %14s %12s\n" target requests instructions "instr/req"
    for target in "${targets[@]}"; do
        [ "$target" = direct ] && continue
        run_wrk "$target" 2s >/dev/null
        callgrind_control -i on "${pid_of[$target]}" >/dev/null
        out=$(run_wrk "$target" "$CALLGRIND_DURATION")
        callgrind_control -d "${pid_of[$target]}" >/dev/null
        callgrind_control -i off "${pid_of[$target]}" >/dev/null
        requests=$(awk '$2 == "requests" && $3 == "in" { print $1 }' <<<"$out")
        file=$work/callgrind.$target.${pid_of[$target]}.1
        instructions=$(awk '$1 == "summary:" || $1 == "totals:" { print $2; exit }' "$file")
        printf "%-26s %10s %14s %12.0f\n" "$target" "$requests" "$instructions" \
            "$(awk -v i="$instructions" -v r="$requests" 'BEGIN { print i / r }')"
        cp "$file" "/tmp/callgrind.$target.out"
    done
    echo "(profiles kept in /tmp/callgrind.<target>.out; callgrind_annotate reads them)"
    exit 0
fi

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $ROUNDS rounds; proxies with $PROXY_WORKERS worker(s) (micro-gateway $GATEWAY_FLAVOR), backend with $BACKEND_THREADS thread(s); $NCPU cpus; $(nginx -v 2>&1 | sed 's/.*: //'), $("$HAPROXY" -v | head -1 | awk '{ print "haproxy " $3 }'), $(wrk --version 2>&1 | head -1 | awk '{ print $1 " " $2 }')" >&2
for target in "${targets[@]}"; do
    measure "$target" "$WARMUP" >/dev/null
done
results=$work/results
for round in $(seq 1 "$ROUNDS"); do
    for target in "${targets[@]}"; do
        for attempt in $(seq 0 "$RETRIES"); do
            line=$(measure "$target" "$DURATION")
            other=${line##* }
            if awk -v o="$other" -v m="$MAX_OTHER_CPU" 'BEGIN { exit !(o <= m) }'; then
                break
            fi
            if [ "$attempt" -lt "$RETRIES" ]; then
                echo "round $round  $target  other load $other > $MAX_OTHER_CPU, measuring again" >&2
                sleep 2
            else
                line="$line busy"
            fi
        done
        echo "round $round  $target  $line" >&2
        echo "$target $line" >>"$results"
    done
done

# The median of the rounds for each column, then the ratios of the medians.
awk -v rounds="$ROUNDS" -v list="${targets[*]}" '
    function median(values, n,    i, j, t, a) {
        split(values, a, " ")
        for (i = 1; i <= n; i++)
            for (j = i + 1; j <= n; j++)
                if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { for (c = 2; c <= 7; c++) col[$1, c] = col[$1, c] " " $c; if ($8 == "busy") busy[$1]++ }
    function ratio(a, b, label) {
        if (!((a, 2) in m) || !((b, 2) in m) || m[b, 6] == 0) return
        printf "%-34s req/s %.2f  p50 %.2f  p99 %.2f  CPU/request %.2f\n", label,
            m[a, 2] / m[b, 2], m[a, 3] / m[b, 3], m[a, 5] / m[b, 5], m[a, 6] / m[b, 6]
    }
    END {
        n = split(list, names, " ")
        printf "\n%-26s %9s %8s %8s %8s %12s %8s\n", "target", "req/s", "p50 ms", "p90 ms",
            "p99 ms", "CPU us/req", "other"
        for (i = 1; i <= n; i++) {
            t = names[i]
            for (c = 2; c <= 7; c++) m[t, c] = median(col[t, c], rounds)
            printf "%-26s %9.0f %8.3f %8.3f %8.3f %12.2f %8.3f%s\n", t, m[t, 2], m[t, 3],
                m[t, 4], m[t, 5], m[t, 6], m[t, 7], busy[t] ? "  (" busy[t] " busy)" : ""
        }
        printf "\nmedians of %d rounds; CPU us/req is the proxy'"'"'s own user+system time\n", rounds
        ratio("micro-gateway", "nginx", "micro-gateway / nginx:")
        ratio("micro-gateway", "haproxy", "micro-gateway / haproxy:")
        ratio("micro-gateway-auth", "haproxy-auth", "micro-gateway / haproxy, JWT+limit:")
        ratio("nginx", "haproxy", "nginx / haproxy:")
        ratio("micro-gateway-before", "nginx", "before / nginx:")
        ratio("micro-gateway-before", "haproxy", "before / haproxy:")
        ratio("micro-gateway-auth-before", "haproxy-auth", "before / haproxy, JWT+limit:")
        ratio("micro-gateway", "micro-gateway-before", "after / before:")
        ratio("micro-gateway-auth", "micro-gateway-auth-before", "after / before, JWT+limit:")
    }
' "$results"
