# Sourced by scripts/servers.sh: `etcd_up` makes sure an etcd server (Debian's
# etcd-server) runs on loopback for the tests, and exports MICRO_TEST_ETCD_ENDPOINT.
#
# Idempotent: an etcd already answering on the port is reused. The port is fixed but
# unusual (23790, or MICRO_ETCD_PORT), so it never meets a system etcd on 2379; its peer
# port is the next one. Data, log and pid file live in $MICRO_SERVERS_DIR/etcd
# (default /var/tmp/micro-servers/etcd). It is a test server: a newly started etcd
# begins with an empty store.

etcd_up() {
    local port="${MICRO_ETCD_PORT:-23790}"
    local peer_port=$((port + 1))
    local dir="${MICRO_SERVERS_DIR:-/var/tmp/micro-servers}/etcd"
    local endpoint="http://127.0.0.1:$port"

    if ! command -v etcd >/dev/null; then
        apt_install etcd-server
    fi
    mkdir -p "$dir"

    if ! etcd_answers "$endpoint"; then
        rm -rf "$dir/data"
        echo "etcd.sh: starting etcd on $endpoint (log: $dir/etcd.log)" >&2
        # Debian's package starts a system etcd through systemd; this one is ours alone.
        nohup etcd \
            --name micro-test \
            --data-dir "$dir/data" \
            --listen-client-urls "$endpoint" \
            --advertise-client-urls "$endpoint" \
            --listen-peer-urls "http://127.0.0.1:$peer_port" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
            --initial-cluster "micro-test=http://127.0.0.1:$peer_port" \
            --auto-compaction-retention 1h \
            >>"$dir/etcd.log" 2>&1 &
        echo $! >"$dir/etcd.pid"
        etcd_wait "$endpoint" "$dir" || return 1
    fi
    export MICRO_TEST_ETCD_ENDPOINT="$endpoint"
}

# Waits up to 30 s for the etcd at $1 (logging to $2/etcd.log) to answer.
etcd_wait() {
    local deadline=$((SECONDS + 30))
    until etcd_answers "$1"; do
        if ((SECONDS >= deadline)); then
            echo "error: etcd did not answer on $1; see $2/etcd.log" >&2
            tail -n 20 "$2/etcd.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

# Whether an etcd answers its health endpoint at $1.
etcd_answers() {
    if command -v curl >/dev/null; then
        local answer
        answer=$(curl -fsS --max-time 2 "$1/health" 2>/dev/null) && [[ $answer == *'"health":"true"'* ]]
    else
        local hostport=${1#http://}
        (exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}") 2>/dev/null
    fi
}
