# Sourced by scripts/servers.sh: `etcd_up` makes sure an etcd server (Debian's
# etcd-server) runs on loopback for the tests, and exports MICRO_TEST_ETCD_ENDPOINT.
#
# Idempotent: an etcd already answering on the port is reused. The port is fixed but
# unusual (23790, or MICRO_ETCD_PORT), so it never meets a system etcd on 2379; its peer
# port is the next one. Data and log live in $MICRO_SERVERS_DIR/etcd
# (default /var/tmp/micro-servers/etcd); remove that directory for a fresh store.

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
        local deadline=$((SECONDS + 30))
        until etcd_answers "$endpoint"; do
            if ((SECONDS >= deadline)); then
                echo "error: etcd did not answer on $endpoint; see $dir/etcd.log" >&2
                tail -n 20 "$dir/etcd.log" >&2
                return 1
            fi
            sleep 0.2
        done
    fi
    export MICRO_TEST_ETCD_ENDPOINT="$endpoint"
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
