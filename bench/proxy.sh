#!/usr/bin/env bash
# The keel sidecar against nginx and HAProxy as HTTP/1.1 reverse proxies, on
# loopback only (127.0.0.1), in one bounded run.
#
# usage: bench/proxy.sh [--out FILE]
#
# Each proxy gets the same CPU allowance: one worker thread or process,
# pinned with taskset to CPU 0 (keel `[server] workers = 1`, nginx
# `worker_processes 1`, HAProxy `nbthread 1`), keep-alive connection pools to
# the upstream, nothing logged. The upstream is one nginx worker answering
# `200 ok` on CPU 1; the load generators run on CPU 1 too. For each proxy,
# and once against the upstream directly (the "direct" row):
#   - throughput at saturation: wrk -t1 -c$CONNECTIONS -d$DURATION (closed
#     loop), with wrk's own p99, and the proxy's CPU seconds over that run
#     (utime + stime from /proc/PID/stat);
#   - p50/p99 at a fixed rate below saturation: the open-loop generator
#     crates/keel-proxy/examples/loadgen.rs at $RATE requests per second
#     (latency from each request's intended send time);
#   - peak RSS (VmHWM) after both runs.
# It prints a Markdown table (also written to --out FILE or $OUT) with the
# tool versions. Progress goes to stderr.
#
# Environment (all optional):
#   DURATION=10       seconds of each measured wrk run and each open-loop run
#   RATE=20000        requests per second of the open-loop runs
#   CONNECTIONS=32    connections of wrk and of the open-loop generator
#   WARMUP=2          seconds of unmeasured wrk load before each target (0: none)
#   ROUNDS=3          rounds; each measures every target in turn, the report shows medians
#   PORT_BASE=18000   uses 127.0.0.1 ports PORT_BASE to PORT_BASE+4
#   PROXY_CPU=0, LOAD_CPU=1   the CPUs described above
#   OUT=FILE          like --out FILE
#   KEEL_BIN, LOADGEN_BIN     use these binaries instead of building them
#   INSTRUCTIONS=1    also count keel's and HAProxy's user-space instructions per
#                     request under valgrind's callgrind (0: skip; installs valgrind)
#   KEEP_TMP=1        keep the temp dir (generated configs, logs, raw output);
#                     it is always kept when the run fails
#
# Installs nginx, haproxy and wrk with apt-get when missing (Debian packages).
# Servers are started by hand from configs in a temp dir (never the repo), on
# their own ports, with their own pid and log files; every process started
# is stopped on exit.
set -euo pipefail

caller_pwd=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'bench/proxy.sh: %b\n' "$*" >&2
    exit 1
}
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$caller_pwd" "$1" ;; esac; }

usage="usage: bench/proxy.sh [--out FILE]   (DURATION, RATE, CONNECTIONS, WARMUP, ROUNDS: see the header)"
out=${OUT:-}
while [ $# -gt 0 ]; do
    case $1 in
    --out) [ $# -ge 2 ] || die "--out needs a file"; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) die "unknown argument '$1'\n$usage" ;;
    esac
done
[ -z "$out" ] || out=$(absolute "$out")

DURATION=${DURATION:-10}
RATE=${RATE:-20000}
CONNECTIONS=${CONNECTIONS:-32}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
INSTRUCTIONS=${INSTRUCTIONS:-1}
PORT_BASE=${PORT_BASE:-18000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
for var in DURATION RATE CONNECTIONS PORT_BASE ROUNDS; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive whole number, got '${!var}'"
done
[[ $INSTRUCTIONS =~ ^[01]$ ]] || die "INSTRUCTIONS must be 0 or 1, got '$INSTRUCTIONS'"
for var in WARMUP PROXY_CPU LOAD_CPU; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var must be a whole number, got '${!var}'"
done
((PORT_BASE + 4 <= 65535)) || die "PORT_BASE must be at most 65531"
[ "$PROXY_CPU" != "$LOAD_CPU" ] || die "PROXY_CPU and LOAD_CPU must differ"

up_port=$PORT_BASE            # the upstream (nginx)
keel_port=$((PORT_BASE + 1))  # keel's data plane
admin_port=$((PORT_BASE + 2)) # keel's admin plane
nginx_port=$((PORT_BASE + 3)) # nginx as the proxy
haproxy_port=$((PORT_BASE + 4))

# ---------------------------------------------------------------- tools
export PATH="$PATH:/usr/sbin:/sbin"
command -v taskset >/dev/null || die "taskset (util-linux) is needed"
cpus=$(nproc)
for cpu in "$PROXY_CPU" "$LOAD_CPU"; do
    taskset -c "$cpu" true 2>/dev/null || die "cannot pin to CPU $cpu (this machine has $cpus CPUs; it needs two)"
done

missing=()
for tool in nginx haproxy wrk; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
command -v pgrep >/dev/null || missing+=(procps)
if [ "$INSTRUCTIONS" = 1 ]; then
    command -v valgrind >/dev/null || missing+=(valgrind)
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (Debian packages)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2 || {
        $sudo apt-get update -qq >&2
        $sudo apt-get install -y --no-install-recommends "${missing[@]}" >&2
    }
    for tool in nginx haproxy wrk pgrep $([ "$INSTRUCTIONS" = 0 ] || echo valgrind callgrind_control); do
        command -v "$tool" >/dev/null || die "$tool is still missing after apt-get install"
    done
fi

target_dir=${CARGO_TARGET_DIR:-target}
if [ -n "${KEEL_BIN:-}" ]; then
    keel_bin=$(absolute "$KEEL_BIN")
else
    log "cargo build --release -p keel-proxy --bin keel"
    cargo build --release -p keel-proxy --bin keel >&2
    keel_bin=$target_dir/release/keel
fi
if [ -n "${LOADGEN_BIN:-}" ]; then
    loadgen_bin=$(absolute "$LOADGEN_BIN")
else
    log "cargo build --release -p keel-proxy --example loadgen"
    cargo build --release -p keel-proxy --example loadgen >&2
    loadgen_bin=$target_dir/release/examples/loadgen
fi
[ -x "$keel_bin" ] || die "no keel binary at $keel_bin"
[ -x "$loadgen_bin" ] || die "no loadgen binary at $loadgen_bin"

# ---------------------------------------------------------------- processes
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-bench.XXXXXX")
pids=() # every process started here and not yet stopped

# Stops `pid` and its children (nginx's workers): TERM, then KILL after 5 s.
stop() {
    local pid=$1 victims i
    victims=("$pid")
    mapfile -t -O 1 victims < <(pgrep -P "$pid" || true)
    kill -TERM "${victims[@]}" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "${victims[@]}" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "${victims[@]}" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}
forget() {
    local keep=() p
    for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    pids=("${keep[@]}")
}
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do stop "$pid"; done
    if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
        log "kept $tmp (generated configs, logs, raw output)"
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a server in the background on `cpu`; sets `started` to its pid.
started=""
start_server() { # log cpu command...
    local log=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$log" 2>&1 &
    started=$!
    pids+=("$started")
}

# Runs a load generator on LOAD_CPU, bounded in time, with its stdout in
# `out` and its stderr in `out.err`.
run_load() { # out command...
    local out=$1 pid rc=0
    shift
    timeout -k 5 "$((DURATION + WARMUP + 30))" taskset -c "$LOAD_CPU" "$@" >"$out" 2>"$out.err" &
    pid=$!
    pids+=("$pid")
    wait "$pid" || rc=$?
    forget "$pid"
    return "$rc"
}

port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Whether 127.0.0.1:port answers `GET /` with 200.
answers_200() {
    local line
    # shellcheck disable=SC2016 # $1 is the inner shell's
    line=$(timeout 2 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" >&3
        IFS= read -r line <&3 && printf "%s" "$line"' _ "$1" 2>/dev/null) || return 1
    [[ $line =~ ^HTTP/1\.[01]\ 200 ]]
}

# Waits up to 15 s for `pid` to answer 200 on `port`; dies with its log if not.
wait_ready() { # name port pid log
    local name=$1 port=$2 pid=$3 log=$4 i
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited while starting; the end of $log:\n$(tail -n 20 "$log")"
        if answers_200 "$port"; then return 0; fi
        sleep 0.1
    done
    die "$name does not answer 200 on 127.0.0.1:$port after 15 s; the end of $log:\n$(tail -n 20 "$log")"
}

# utime + stime, in clock ticks, of a process and its children.
cpu_ticks() { # pid
    local total=0 pid fields
    for pid in "$1" $(pgrep -P "$1" || true); do
        [ -r "/proc/$pid/stat" ] || continue
        # Past the command name (which may hold spaces), the fields start at
        # the state (field 3), so utime (14) and stime (15) are 11 and 12.
        read -r -a fields <<<"$(sed 's/^.*) //' "/proc/$pid/stat")"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Peak RSS in KiB: the sum over a process's children (nginx's worker; its
# idle master is left out), or the process's own when it has none.
peak_rss_kib() { # pid
    local total=0 pid kib children
    children=$(pgrep -P "$1" || true)
    for pid in ${children:-$1}; do
        kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# The value of `key=value` in a line of such fields.
field() { # line key
    awk -v key="$2" '{ for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) { print substr($i, length(key) + 2); exit } }' <<<"$1"
}

for port in "$up_port" "$keel_port" "$admin_port" "$nginx_port" "$haproxy_port"; do
    if port_in_use "$port"; then
        die "127.0.0.1:$port is in use; free it or set PORT_BASE (this run uses $PORT_BASE to $((PORT_BASE + 4)))"
    fi
done

# ---------------------------------------------------------------- configs
# nginx's master starts as root only when this script runs as root; its
# worker then drops to nobody (Debian's group for it is nogroup).
nginx_user=""
if [ "$(id -u)" -eq 0 ]; then
    nginx_user="user nobody $(getent group nogroup >/dev/null && echo nogroup || echo nobody);"
fi

nginx_common() { # dir
    cat <<EOF
daemon off;
worker_processes 1;
$nginx_user
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_temp_paths() { # dir
    local what
    for what in client_body proxy fastcgi uwsgi scgi; do
        echo "    ${what}_temp_path $1/$what;"
    done
}

mkdir -p "$tmp/upstream" "$tmp/nginx" "$tmp/haproxy" "$tmp/keel"

# The upstream: a small fixed answer. keepalive_requests is raised (default
# 1000) so that no proxy's pool is made to reconnect every 1000 requests.
{
    nginx_common "$tmp/upstream"
    cat <<EOF
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$(nginx_temp_paths "$tmp/upstream")
    server {
        listen 127.0.0.1:$up_port backlog=4096;
        location / { return 200 "ok\n"; }
    }
}
EOF
} >"$tmp/upstream/nginx.conf"

# nginx as the proxy: a keep-alive pool of up to 64 idle connections.
{
    nginx_common "$tmp/nginx"
    cat <<EOF
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
$(nginx_temp_paths "$tmp/nginx")
    upstream bench {
        server 127.0.0.1:$up_port;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$nginx_port backlog=4096;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
} >"$tmp/nginx/nginx.conf"

# HAProxy: one thread, keep-alive on both sides, idle server connections
# shared between client connections. No `log` line: nothing is logged.
cat >"$tmp/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s

frontend bench
    bind 127.0.0.1:$haproxy_port
    default_backend upstream

backend upstream
    server upstream1 127.0.0.1:$up_port
EOF

# keel: one worker, retries and a circuit breaker (its defaults) on the one
# route; metrics are always on. Logging only warns (no access log exists).
cat >"$tmp/keel/keel.toml" <<EOF
[server]
listen = "127.0.0.1:$keel_port"
admin = "127.0.0.1:$admin_port"
workers = 1
shutdown_timeout = "1s"

[upstreams.bench]
endpoints = ["127.0.0.1:$up_port"]

[[routes]]
name = "bench"
path_prefix = "/"
upstream = "bench"

[routes.retry]
max_attempts = 3
per_try_timeout = "1s"
on = ["connect-failure", "5xx"]

[routes.circuit_breaker]
EOF

# wrk's numbers in one machine-readable line (latencies in microseconds).
cat >"$tmp/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "wrkstats requests=%.0f duration_us=%.0f p50_us=%.0f p99_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
EOF

nginx -t -q -p "$tmp/upstream/" -e "$tmp/upstream/error.log" -c "$tmp/upstream/nginx.conf" ||
    die "the upstream's nginx config is rejected: $tmp/upstream/nginx.conf"
nginx -t -q -p "$tmp/nginx/" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf" ||
    die "the proxy's nginx config is rejected: $tmp/nginx/nginx.conf"
haproxy -q -c -f "$tmp/haproxy/haproxy.cfg" >&2 || die "HAProxy rejects $tmp/haproxy/haproxy.cfg"
"$keel_bin" check --config "$tmp/keel/keel.toml" >&2 || die "keel rejects $tmp/keel/keel.toml"

# ---------------------------------------------------------------- versions
nginx_version=$(nginx -v 2>&1 | sed 's/^nginx version: //')
haproxy_version=$(haproxy -v 2>&1 | head -n 1 | sed 's/ - https.*//' || true)
wrk_version=$(wrk -v 2>&1 | head -n 1 | sed 's/ Copyright.*//' || true)
keel_rev=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$keel_rev" != unknown ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    keel_rev="$keel_rev (with uncommitted changes)"
fi
rustc_version=$(rustc --version 2>/dev/null || echo "rustc unknown")
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
clk_tck=$(getconf CLK_TCK)
cpu_note=""
if [ "$cpus" -eq 2 ]; then cpu_note=" (only two, hence the sharing below)"; fi

# ---------------------------------------------------------------- runs
declare -A rps wrk_p99 p50 p99 cpu_s eff rss_mib notes rounds_rps

# Loads `url` (the proxy `pid`, or none for the direct row) and records the
# row `name`.
measure() { # name url [pid]
    local name=$1 url=$2 pid=${3:-} before=0 after=0 line requests us errs
    if [ "$WARMUP" -gt 0 ]; then
        log "$name: warm-up, wrk ${WARMUP}s"
        run_load "$tmp/$name.warmup" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "$url" ||
            die "wrk (warm-up) against $name failed:\n$(cat "$tmp/$name.warmup.err")"
    fi

    log "$name: wrk -t1 -c$CONNECTIONS -d${DURATION}s"
    [ -z "$pid" ] || before=$(cpu_ticks "$pid")
    run_load "$tmp/$name.wrk" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$tmp/report.lua" "$url" ||
        die "wrk against $name failed:\n$(cat "$tmp/$name.wrk.err")"
    [ -z "$pid" ] || after=$(cpu_ticks "$pid")
    line=$(grep '^wrkstats ' "$tmp/$name.wrk") || die "no summary from wrk against $name:\n$(cat "$tmp/$name.wrk")"
    requests=$(field "$line" requests)
    us=$(field "$line" duration_us)
    rps[$name]=$(awk -v n="$requests" -v us="$us" 'BEGIN { printf "%.0f", (us > 0 ? n / (us / 1e6) : 0) }')
    wrk_p99[$name]=$(awk -v us="$(field "$line" p99_us)" 'BEGIN { printf "%.3f", us / 1000 }')
    errs=$(($(field "$line" connect) + $(field "$line" read) + $(field "$line" write) + $(field "$line" timeout)))
    if [ "$errs" -gt 0 ] || [ "$(field "$line" status)" -gt 0 ]; then
        notes[$name]+="wrk: $errs socket errors, $(field "$line" status) non-2xx/3xx answers. "
    fi
    if [ -n "$pid" ]; then
        cpu_s[$name]=$(awk -v t=$((after - before)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }')
        # Requests per CPU second: what the proxy does with the CPU it
        # got, which time stolen by the machine's neighbours moves less.
        eff[$name]=$(awk -v n="$requests" -v c="${cpu_s[$name]}" 'BEGIN { printf "%.0f", (c > 0 ? n / c : 0) }')
    else
        cpu_s[$name]="–"
        eff[$name]="–"
    fi
    log "$name: ${rps[$name]} req/s, p99 ${wrk_p99[$name]} ms, CPU ${cpu_s[$name]} s"

    log "$name: loadgen --rate $RATE --duration $DURATION --connections $CONNECTIONS"
    run_load "$tmp/$name.loadgen" "$loadgen_bin" --url "$url" --rate "$RATE" \
        --duration "$DURATION" --connections "$CONNECTIONS" ||
        die "loadgen against $name failed:\n$(cat "$tmp/$name.loadgen.err")"
    line=$(grep '^loadgen ' "$tmp/$name.loadgen") || die "no summary from loadgen against $name"
    p50[$name]=$(field "$line" p50_ms)
    p99[$name]=$(field "$line" p99_ms)
    if [ "$(field "$line" errors)" != 0 ] || [ "$(field "$line" unsent)" != 0 ]; then
        notes[$name]+="loadgen: $(field "$line" errors) errors, $(field "$line" unsent) not sent in time ($(head -c 300 "$tmp/$name.loadgen.err" | tr '\n' ' ')). "
    fi
    notes[$name]+="loadgen: $(field "$line" ok) ok of $(field "$line" scheduled), generator lag p99 $(field "$line" lag_p99_ms) ms. "
    log "$name: at $RATE/s p50 ${p50[$name]} ms, p99 ${p99[$name]} ms"

    if [ -n "$pid" ]; then
        rss_mib[$name]=$(awk -v k="$(peak_rss_kib "$pid")" 'BEGIN { printf "%.1f", k / 1024 }')
    else
        rss_mib[$name]="–"
    fi
}

log "upstream: nginx on CPU $LOAD_CPU, 127.0.0.1:$up_port"
start_server "$tmp/upstream/stderr.log" "$LOAD_CPU" \
    nginx -p "$tmp/upstream/" -e "$tmp/upstream/error.log" -c "$tmp/upstream/nginx.conf"
upstream_pid=$started
wait_ready "the upstream nginx" "$up_port" "$upstream_pid" "$tmp/upstream/error.log"

# All three proxies run side by side on CPU $PROXY_CPU (an idle one costs
# nothing) so that the rounds can interleave them: this machine's speed
# drifts by tens of percent over minutes, and interleaving spreads the drift
# over every target instead of favouring whichever ran in a quiet minute.
log "HAProxy on CPU $PROXY_CPU, 127.0.0.1:$haproxy_port"
start_server "$tmp/haproxy/haproxy.log" "$PROXY_CPU" \
    haproxy -db -f "$tmp/haproxy/haproxy.cfg" -p "$tmp/haproxy/haproxy.pid"
haproxy_pid=$started
wait_ready HAProxy "$haproxy_port" "$haproxy_pid" "$tmp/haproxy/haproxy.log"

log "nginx (proxy) on CPU $PROXY_CPU, 127.0.0.1:$nginx_port"
start_server "$tmp/nginx/stderr.log" "$PROXY_CPU" \
    nginx -p "$tmp/nginx/" -e "$tmp/nginx/error.log" -c "$tmp/nginx/nginx.conf"
nginx_pid=$started
wait_ready "nginx (proxy)" "$nginx_port" "$nginx_pid" "$tmp/nginx/error.log"

log "keel on CPU $PROXY_CPU, 127.0.0.1:$keel_port"
start_server "$tmp/keel/keel.log" "$PROXY_CPU" \
    env KEEL_LOG=warn "$keel_bin" run --config "$tmp/keel/keel.toml"
keel_pid=$started
wait_ready keel "$keel_port" "$keel_pid" "$tmp/keel/keel.log"

declare -A all_rps all_p50 all_p99 all_wrk_p99 all_cpu all_eff
record() { # name
    all_rps[$1]+=" ${rps[$1]}"
    all_p50[$1]+=" ${p50[$1]}"
    all_p99[$1]+=" ${p99[$1]}"
    all_wrk_p99[$1]+=" ${wrk_p99[$1]}"
    all_cpu[$1]+=" ${cpu_s[$1]}"
    all_eff[$1]+=" ${eff[$1]}"
}
order=(direct haproxy nginx keel)
for ((round = 1; round <= ROUNDS; round++)); do
    log "round $round of $ROUNDS: ${order[*]}"
    for name in "${order[@]}"; do
        case $name in
            direct) measure direct "http://127.0.0.1:$up_port/" ;;
            haproxy) measure haproxy "http://127.0.0.1:$haproxy_port/" "$haproxy_pid" ;;
            nginx) measure nginx "http://127.0.0.1:$nginx_port/" "$nginx_pid" ;;
            keel) measure keel "http://127.0.0.1:$keel_port/" "$keel_pid" ;;
        esac
        record "$name"
    done
    order=("${order[@]:1}" "${order[0]}") # the next round starts one later
done
stop "$keel_pid"
stop "$nginx_pid"
stop "$haproxy_pid"

# The median of the rounds, and every round's value for throughput.
median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0 || v[1] == "–") print "–"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for name in direct haproxy nginx keel; do
    rounds_rps[$name]=$(tr ' ' '\n' <<<"${all_rps[$name]}" | grep -v '^$' | paste -sd/ -)
    rps[$name]=$(median "${all_rps[$name]}" | awk '{ printf "%.0f", $1 }')
    p50[$name]=$(median "${all_p50[$name]}")
    p99[$name]=$(median "${all_p99[$name]}")
    wrk_p99[$name]=$(median "${all_wrk_p99[$name]}")
    cpu_s[$name]=$(median "${all_cpu[$name]}")
    eff[$name]=$(median "${all_eff[$name]}" | awk '{ printf ($1 == "–" ? "%s" : "%.0f"), $1 }')
done

# ---------------------------------------------------------------- instructions
# User-space instructions per request, which this machine's drift does not
# move: keel and HAProxy each run alone under callgrind, are warmed up, have
# their counters zeroed, serve wrk for DURATION, and have them dumped. Under
# valgrind both serve about 40x fewer requests a second than at full speed
# (fewer requests per event-loop turn): a like-for-like count, not that of a
# saturated run. nginx (a master forking its worker) is left out.
declare -A ir
if [ "$INSTRUCTIONS" = 1 ]; then
    for name in haproxy keel; do
        dir=$tmp/callgrind-$name
        mkdir -p "$dir"
        grind=(valgrind --tool=callgrind "--callgrind-out-file=$dir/out")
        case $name in
            haproxy)
                port=$haproxy_port
                start_server "$dir/stderr.log" "$PROXY_CPU" "${grind[@]}" haproxy -db -f "$tmp/haproxy/haproxy.cfg"
                ;;
            keel)
                port=$keel_port
                start_server "$dir/stderr.log" "$PROXY_CPU" env KEEL_LOG=warn "${grind[@]}" "$keel_bin" run --config "$tmp/keel/keel.toml"
                ;;
        esac
        pid=$started
        log "$name under callgrind: starting (slowly)"
        for ((i = 0; i < 600; i++)); do
            kill -0 "$pid" 2>/dev/null || die "$name exited under callgrind; the end of its log:\n$(tail -n 20 "$dir/stderr.log")"
            if answers_200 "$port"; then break; fi
            sleep 0.1
        done
        answers_200 "$port" || die "$name does not answer under callgrind after 60 s"
        run_load "$dir/warmup" wrk -t1 -c"$CONNECTIONS" -d"$((WARMUP > 0 ? WARMUP : 1))s" "http://127.0.0.1:$port/" ||
            die "wrk (warm-up) against $name under callgrind failed"
        callgrind_control -z "$pid" >/dev/null
        log "$name under callgrind: wrk -t1 -c$CONNECTIONS -d${DURATION}s"
        run_load "$dir/wrk" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$tmp/report.lua" "http://127.0.0.1:$port/" ||
            die "wrk against $name under callgrind failed"
        callgrind_control -d "$pid" >/dev/null
        for ((i = 0; i < 100; i++)); do
            [ -s "$dir/out.1" ] && grep -q '^totals:' "$dir/out.1" && break
            sleep 0.1
        done
        stop "$pid"
        requests=$(field "$(grep '^wrkstats ' "$dir/wrk")" requests)
        total=$(awk '/^summary:/ { print $2; exit }' "$dir/out.1" 2>/dev/null || true)
        if [ -z "$total" ] || [ "${requests:-0}" -le 0 ]; then
            die "no callgrind count for $name (see $dir)"
        fi
        ir[$name]=$((total / requests))
        log "$name under callgrind: ${ir[$name]} instructions per request over $requests requests"
    done
fi

stop "$upstream_pid"

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="${rps[haproxy]}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "–" }'; }
eff_ratio() { awk -v a="$1" -v b="${eff[haproxy]}" 'BEGIN { if (a != "–" && b > 0) printf "%.2f", a / b; else print "–" }'; }

slowest=$(printf '%s\n' "${rps[keel]}" "${rps[nginx]}" "${rps[haproxy]}" | sort -n | head -n 1)
report=$(
    cat <<EOF
## keel proxy vs nginx vs HAProxy (loopback, one CPU each)

- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); ${cpu_model:-unknown CPU}, Linux $(uname -r).
- Versions: keel $keel_rev ($rustc_version, --release); $nginx_version; $haproxy_version; $wrk_version.
- CPUs: this machine has $cpus CPUs$cpu_note. The three proxies run side by side (each idle while another is measured), one worker each, pinned to CPU $PROXY_CPU (keel \`workers = 1\`, nginx \`worker_processes 1\`, HAProxy \`nbthread 1\`); the upstream (one nginx worker answering \`200 ok\`) and the load generator share CPU $LOAD_CPU, so every row, the direct one included, is also bounded by that CPU.
- Proxies: HTTP/1.1 keep-alive to the client and to the upstream (nginx \`keepalive 64\`, HAProxy \`http-reuse always\`, keel's pool), nothing logged. keel's route has retries (3 attempts, 1s per try, on connect-failure and 5xx) and a circuit breaker (defaults); metrics are always on.
- Rounds: $ROUNDS; in each, every target is measured in turn (the order rotates by one each round); the table shows the median of the rounds, the details every round's throughput.
- Throughput: \`wrk -t1 -c$CONNECTIONS -d${DURATION}s\` (closed loop, after ${WARMUP}s of warm-up), with wrk's p99 at that saturation and the proxy's CPU seconds (user + system) during it; requests per CPU second divides the two (time stolen from this virtual machine moves it less than throughput). p50/p99: the open-loop \`loadgen\` (crates/keel-proxy/examples/loadgen.rs) at $RATE req/s for ${DURATION}s over $CONNECTIONS connections, each latency from its request's intended send time. Peak RSS: VmHWM after both runs (nginx: its worker's).

| target | throughput (req/s) | × HAProxy | req per CPU s | × HAProxy | p50 ms @ $RATE/s | p99 ms @ $RATE/s | wrk p99 ms (saturated) | CPU s (wrk run) | peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
EOF
    for name in keel nginx haproxy direct; do
        label=$name
        [ "$name" = direct ] && label="direct (no proxy)"
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "${rps[$name]}" "$(ratio "${rps[$name]}")" \
            "${eff[$name]}" "$(eff_ratio "${eff[$name]}")" \
            "${p50[$name]}" "${p99[$name]}" "${wrk_p99[$name]}" "${cpu_s[$name]}" "${rss_mib[$name]}"
    done
    echo
    if awk -v r="$RATE" -v s="$slowest" 'BEGIN { exit !(r > 0.8 * s) }'; then
        echo "Warning: RATE=$RATE is above 80% of the slowest proxy's throughput ($slowest req/s); its p50/p99 measure queueing. Lower RATE."
        echo
    fi
    for name in keel nginx haproxy; do
        if awk -v a="${rps[$name]}" -v d="${rps[direct]}" 'BEGIN { exit !(a > 0.9 * d) }'; then
            echo "Note: $name comes within 10% of the direct run, which is bounded by CPU $LOAD_CPU (upstream and wrk): its throughput may be limited by that CPU rather than by the proxy."
            echo
        fi
    done
    if [ "$INSTRUCTIONS" = 1 ]; then
        echo "User-space instructions per request under callgrind (see the script's header): keel ${ir[keel]}, HAProxy ${ir[haproxy]} ($(awk -v a="${ir[keel]}" -v b="${ir[haproxy]}" 'BEGIN { printf "%.2f", a / b }')x)."
        echo
    fi
    echo "Details:"
    for name in keel nginx haproxy direct; do
        echo "- $name: throughput per round ${rounds_rps[$name]} req/s. ${notes[$name]:-}"
    done
)

printf '%s\n' "$report"
if [ -n "$out" ]; then
    mkdir -p "$(dirname "$out")"
    printf '%s\n' "$report" >"$out"
    log "written to $out"
fi
