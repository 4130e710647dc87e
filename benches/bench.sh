#!/usr/bin/env bash
# regmirror benchmark: one run, one table, on loopback only.
#
#   benches/bench.sh                 (root recommended: installs missing Debian packages)
#
# Builds nothing: runs ${REGMIRROR_BIN:-target/release/regmirror} next to the Debian
# `docker-registry` (distribution 2.8) in proxy mode, both mirroring the same upstream — a
# `docker-registry` behind an nginx reverse proxy whose access log counts every upstream request —
# and an nginx serving the blob files statically (sendfile on) as a ceiling.
#
# Measures: cold pull of a fresh blob (vs curl straight from the upstream), warm blob throughput,
# manifest-by-tag requests/s (wrk), fan-out of concurrent clients on one uncached blob (wall time,
# upstream GETs), peak RSS, and regmirror's TLS (new handshakes/s, warm throughput).
# Prints the table with PASS/MISS per target and writes it to benches/results.txt.
#
# Environment (defaults in brackets):
#   REGMIRROR_BIN [target/release/regmirror]   BENCH_BLOB_MIB [256]   BENCH_COLD_RUNS [2]
#   BENCH_WARM_RUNS [5]   BENCH_FANOUT [16]   BENCH_WRK_SECS [5]   BENCH_STIME_SECS [5]
#   BENCH_IDLE_WAIT [60]  seconds to wait at most for the machine to go idle before starting
#   BENCH_SETTLE_WAIT [8]  seconds to wait at most, before each timed measurement, for the
#                 daemons' background work to end and the machine to go quiet
#   BENCH_SETTLE_BUDGET [60]  seconds of such waiting for other processes in all, per run
#   BENCH_PREFAULT_MIB [auto]  fresh memory to touch once before measuring (0: none); see below
#   BENCH_KEEP=1  keep the temp dir (logs, configs, nginx access log)
#   RUST_LOG      passed to regmirror (unset: its default, info — one line per request)
#
# Fairness measures: every timed measurement starts once the daemons' own background work (the
# reference stores a blob after serving it) has stopped and dirty pages are synced; CPU used by
# processes outside this script is measured per phase and reported (on a shared machine, re-run
# when it is high). On VMs that back guest memory lazily, the first write to a never-used page is
# a host fault (~2-3 s of system time per GiB on Firecracker); it lands on whichever process
# writes new page-cache pages (a mirror filling its cache), so the script touches enough fresh
# memory once, up front, and frees it.

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=${REGMIRROR_BIN:-$REPO/target/release/regmirror}
BLOB_MIB=${BENCH_BLOB_MIB:-256}
COLD_RUNS=${BENCH_COLD_RUNS:-2}
WARM_RUNS=${BENCH_WARM_RUNS:-5}
FANOUT=${BENCH_FANOUT:-16}
WRK_SECS=${BENCH_WRK_SECS:-5}
STIME_SECS=${BENCH_STIME_SECS:-5}
IDLE_WAIT=${BENCH_IDLE_WAIT:-60}
PREFAULT_MIB=${BENCH_PREFAULT_MIB:-auto}
SETTLE_WAIT=${BENCH_SETTLE_WAIT:-8}
SETTLE_BUDGET=${BENCH_SETTLE_BUDGET:-60}
KEEP=${BENCH_KEEP:-0}
RESULTS=$HERE/results.txt
LIB=$HERE/benchlib.py
PY=python3
BLOB_BYTES=$((BLOB_MIB * 1024 * 1024))
ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'
WRK_ARGS="-t2 -c32 -d${WRK_SECS}s"

say() { printf '[bench %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { say "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need docker-registry docker-registry
need nginx nginx-light
need wrk wrk
need curl curl
need openssl openssl
need "$PY" python3
need sha256sum coreutils
need timeout coreutils
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null ||
            die "apt-get install -y ${missing[*]} failed"
    else
        die "missing packages: ${missing[*]} (apt-get install -y ${missing[*]})"
    fi
fi
[ -x "$BIN" ] || die "no regmirror binary at $BIN (build it, or set REGMIRROR_BIN)"
for n in BLOB_MIB COLD_RUNS WARM_RUNS FANOUT WRK_SECS STIME_SECS; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer (got '${!n}')"
done
[[ $IDLE_WAIT =~ ^[0-9]+$ ]] || die "BENCH_IDLE_WAIT must be a number of seconds (got '$IDLE_WAIT')"
[[ $SETTLE_WAIT =~ ^[0-9]+$ ]] || die "BENCH_SETTLE_WAIT must be a number of seconds (got '$SETTLE_WAIT')"
[[ $SETTLE_BUDGET =~ ^[0-9]+$ ]] || die "BENCH_SETTLE_BUDGET must be a number of seconds (got '$SETTLE_BUDGET')"
NBLOBS=$((1 + 2 * COLD_RUNS + 2))
# Written during a run: every blob once upstream, each mirror's cold and fan-out blobs once more.
WRITE_MIB=$(((NBLOBS + 2 * (COLD_RUNS + 1)) * BLOB_MIB))
if [ "$PREFAULT_MIB" = auto ]; then PREFAULT_MIB=$((WRITE_MIB * 5 / 4)); fi
[[ $PREFAULT_MIB =~ ^[0-9]+$ ]] || die "BENCH_PREFAULT_MIB must be auto or a number (got '$PREFAULT_MIB')"
AVAIL_MIB=$(awk '/MemAvailable/ { print int($2 / 1024) }' /proc/meminfo)
[ "$PREFAULT_MIB" -le $((AVAIL_MIB / 2)) ] || PREFAULT_MIB=$((AVAIL_MIB / 2))
FREE_DISK_MIB=$(df -Pm /tmp | awk 'NR == 2 { print $4 }')
[ "$FREE_DISK_MIB" -gt $((WRITE_MIB + 1024)) ] || die "need about $((WRITE_MIB + 1024)) MiB free in /tmp, have $FREE_DISK_MIB"

T=$(mktemp -d /tmp/regmirror-bench.XXXXXX)
LOG=$T/logs
FIG=$T/figures
mkdir -p "$LOG" "$T/nginx" "$T/up" "$T/ref" "$T/rm" "$T/fan"
# A private copy: the binary may be rebuilt while we run (the TLS step restarts it).
BIN_SRC=$BIN
BIN=$T/regmirror
cp "$BIN_SRC" "$BIN" || die "cannot copy $BIN_SRC"
: >"$FIG"
fig() { printf '%s=%s\n' "$1" "$2" >>"$FIG"; }
note() {
    local text
    text=$(printf '%s' "$*" | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ')
    NOTE_N=$(($(grep -c '^note' "$FIG") + 1)) # notes may come from subshells
    fig "$(printf 'note%02d' "$NOTE_N")" "$text"
    say "note: $text"
}

# ---------------------------------------------------------------------------------------------
# Daemons and cleanup
# ---------------------------------------------------------------------------------------------

DAEMONS=()
declare -A PID=()

stop_daemon() { # name
    local pid=${PID[$1]:-} i
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    PID[$1]=
}

cleanup() {
    local rc=$? i p
    trap - EXIT INT TERM
    for p in $(jobs -p); do kill -TERM "$p" 2>/dev/null; done # curl/wrk/s_time still running
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_daemon "${DAEMONS[$i]}"; done
    if [ "$KEEP" = 1 ]; then say "kept $T"; else rm -rf "$T"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_daemon() { # name logfile command...
    local name=$1 logfile=$2
    shift 2
    "$@" >"$logfile" 2>&1 </dev/null &
    PID[$name]=$!
    DAEMONS+=("$name")
}
alive() { [ -n "${PID[$1]:-}" ] && kill -0 "${PID[$1]}" 2>/dev/null; }

wait_until() { # seconds daemon command... : bounded readiness poll
    local secs=$1 name=$2 i
    shift 2
    for ((i = 0; i < secs * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        alive "$name" || return 1
        sleep 0.1
    done
    return 1
}
http_ok() { curl -fsS -o /dev/null --max-time 2 "$@"; }

# fetch URL [curl args...] -> "code size seconds bytes_per_second"
fetch() {
    local url=$1 out
    shift
    out=$(curl -sS -o /dev/null --max-time 120 "$@" \
        -w '%{http_code} %{size_download} %{time_total} %{speed_download}' "$url" 2>>"$LOG/curl.err")
    echo "${out:-000 0 0 0}"
}
# When a request misbehaves, keep what the server said.
explain() { # label url [curl args...]
    local label=$1 url=$2
    shift 2
    note "$label: GET $url -> $(curl -sS -o >(head -c 300 >"$T/body") -D - --max-time 30 "$@" "$url" 2>&1 |
        head -1 | tr -d '\r') $(head -c 200 "$T/body" 2>/dev/null | tr '\n' ' ')"
}
median() { $PY "$LIB" median "$@"; }

# CPU bookkeeping per phase: the daemons' CPU seconds, and CPU used by processes not ours.
declare -A CPU=()
snap() {
    $PY "$LIB" cpu-snap $$ "rm=${PID[regmirror_tls]:-${PID[regmirror]:-x}}" "ref=${PID[reference]:-x}" \
        "up=${PID[upstream]:-x}" "ngx=${PID[nginx]:-x}"
}
# Timed windows inside a phase (fg_begin/fg_end; they may run in subshells, hence the file): the
# CPU other processes used while we were actually measuring.
fg_begin() { FG0=$(snap); }
fg_end() { $PY "$LIB" cpu-diff "$FG0" "$(snap)" | awk '{ for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "wall" || kv[1] == "foreign") printf "%s ", kv[2] } print "" }' >>"$T/fg"; }
phase_begin() { PHASE=$1; : >"$T/fg"; SNAP0=$(snap); }
phase_end() {
    local kv fgw fgf
    CPU=()
    for kv in $($PY "$LIB" cpu-diff "$SNAP0" "$(snap)"); do CPU[${kv%%=*}]=${kv#*=}; done
    read -r fgw fgf <<<"$(awk '{ w += $1; f += $2 } END { printf "%.2f %.2f", w, f }' "$T/fg")"
    if awk -v w="$fgw" 'BEGIN { exit !(w > 0) }'; then # report only what overlapped measurements
        CPU[foreign]=$fgf
        CPU[foreign_pct]=$(awk -v w="$fgw" -v f="$fgf" -v n="$(nproc)" 'BEGIN { printf "%.0f", 100 * f / (w * n) }')
    fi
    fig "foreign_${PHASE}_pct" "${CPU[foreign_pct]:-?}"
    fig "foreign_${PHASE}_s" "${CPU[foreign]:-?}"
    say "  [$PHASE: ${CPU[wall]:-?}s; CPU s: regmirror ${CPU[rm]:-?}, reference ${CPU[ref]:-?}, upstream ${CPU[up]:-?}, nginx ${CPU[ngx]:-?}, other processes ${CPU[foreign]:-?} (${CPU[foreign_pct]:-?}% of the machine)]"
    alive "$(rm_name)" && fig "hwm_${PHASE}_rm" "$(hwm "${PID[$(rm_name)]}")"
    alive reference && fig "hwm_${PHASE}_ref" "$(hwm "${PID[reference]}")"
}
rm_name() { if alive regmirror_tls; then echo regmirror_tls; else echo regmirror; fi; }
per() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.3f", a / b }'; }
hwm() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null; }
# Before a timed measurement: the daemons' background work done, dirty pages written.
# Waiting for other tenants is bounded per call (BENCH_SETTLE_WAIT) and in all (BENCH_SETTLE_BUDGET,
# kept in a file because settle also runs in subshells); past the budget, only our own daemons are
# waited for.
settle() {
    local p pids=() t0 spent machine=1
    for p in "${PID[@]}"; do [ -n "$p" ] && pids+=("$p"); done
    sync
    spent=$(awk '{ s += $1 } END { printf "%d", s }' "$T/settle-spent" 2>/dev/null)
    [ "${spent:-0}" -lt "$SETTLE_BUDGET" ] || machine=0
    t0=$(date +%s.%N)
    $PY "$LIB" settle "$SETTLE_WAIT" "$machine" "${pids[@]}" >/dev/null
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f\n", b - a }' >>"$T/settle-spent"
}
mbs() { awk -v b="$1" 'BEGIN { if (b == "") print ""; else printf "%.1f", b / 1e6 }'; }

PORTS=($($PY "$LIB" ports 9))
[ ${#PORTS[@]} = 9 ] || die "could not find free ports"
P_UP=${PORTS[0]} P_NGX=${PORTS[1]} P_STATIC=${PORTS[2]} P_REF=${PORTS[3]} P_RM=${PORTS[4]}
P_RMM=${PORTS[5]} P_TLS=${PORTS[6]} P_TLSM=${PORTS[7]}
UP=http://127.0.0.1:$P_UP
NGX=http://127.0.0.1:$P_NGX
STATIC=http://127.0.0.1:$P_STATIC
REF=http://127.0.0.1:$P_REF
RM=http://127.0.0.1:$P_RM
NGX_LOG=$LOG/upstream-access.log

fig date "$(date -u '+%F %T UTC')"
fig bin "$BIN_SRC"
fig bin_mtime "$(date -r "$BIN_SRC" '+%F %T'), sha256 $(sha256sum "$BIN" | cut -c1-12)"
fig ref_version "$(docker-registry --version 2>&1 | awk '{print $NF}')"
fig nginx_version "$(nginx -v 2>&1 | sed 's|.*/||')"
fig cpus "$(nproc)"
fig mem "$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
fig blob_mib "$BLOB_MIB"
fig cold_runs "$COLD_RUNS"
fig warm_runs "$WARM_RUNS"
fig fanout "$FANOUT"
fig wrk_args "$WRK_ARGS"
say "temp dir $T; binary $BIN_SRC"

if [ "$IDLE_WAIT" -gt 0 ]; then
    busy=$($PY "$LIB" wait-idle "$IDLE_WAIT")
    fig busy_at_start_pct "$busy"
    [ "${busy:-100}" -lt 15 ] || note "the machine was ${busy}% busy when the run started (waited ${IDLE_WAIT}s for it to go idle); figures may be low"
fi
if [ "$PREFAULT_MIB" -gt 0 ]; then
    say "touching $PREFAULT_MIB MiB of fresh memory once"
    pf=$($PY "$LIB" prefault "$PREFAULT_MIB")
    note "prefault: touched $PREFAULT_MIB MiB of memory in ${pf}s before measuring ($(per "$pf" "$((PREFAULT_MIB))" | awk '{ printf "%.1f", $1 * 1024 }') s/GiB; about 0.1 s/GiB means the pages were already backed)"
fi

# ---------------------------------------------------------------------------------------------
# 1. Setup: upstream registry, counting nginx + static nginx, seed, both mirrors
# ---------------------------------------------------------------------------------------------

cat >"$T/upstream.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $T/up
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$P_UP
  secret: regmirror-bench-upstream
EOF
start_daemon upstream "$LOG/upstream.log" docker-registry serve "$T/upstream.yml"
wait_until 20 upstream http_ok "$UP/v2/" || die "upstream registry did not start: $(tail -5 "$LOG/upstream.log")"

BLOBDIR=$T/up/docker/registry/v2/blobs/sha256
NGX_USER=
[ "$(id -u)" = 0 ] && NGX_USER="user root;" # workers must read the 0700 temp dir
for d in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$T/nginx/$d"; done
cat >"$T/nginx/nginx.conf" <<EOF
$NGX_USER
worker_processes 2;
pid $T/nginx/nginx.pid;
error_log $LOG/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path $T/nginx/client_body;
    proxy_temp_path $T/nginx/proxy;
    fastcgi_temp_path $T/nginx/fastcgi;
    uwsgi_temp_path $T/nginx/uwsgi;
    scgi_temp_path $T/nginx/scgi;
    types { }
    default_type application/octet-stream;
    log_format count '\$msec "\$request_method \$uri" \$status \$body_bytes_sent \$request_time';

    upstream registry { server 127.0.0.1:$P_UP; keepalive 64; }

    # The upstream as both mirrors see it: every request logged, bodies streamed unbuffered.
    server {
        listen 127.0.0.1:$P_NGX;
        access_log $NGX_LOG count;
        client_max_body_size 0;
        location / {
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
            proxy_buffering off;
            proxy_buffer_size 256k;
            proxy_buffers 4 256k;
            proxy_busy_buffers_size 256k;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
        }
    }

    # Ceiling: the upstream's blob files, served straight from disk / page cache.
    server {
        listen 127.0.0.1:$P_STATIC;
        location /blobs/ { alias $BLOBDIR/; }
    }
}
EOF
start_daemon nginx "$LOG/nginx.log" nginx -e "$LOG/nginx-error.log" -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;'
wait_until 20 nginx http_ok "$NGX/v2/" || die "nginx did not start: $(tail -5 "$LOG/nginx-error.log")"

push_blob() { # file hex
    local file=$1 hex=$2 loc sep code
    loc=$(curl -sS -o /dev/null -D - --max-time 10 -X POST "$UP/v2/library/bench/blobs/uploads/" |
        awk 'tolower($1) == "location:" { print $2 }' | tr -d '\r')
    [ -n "$loc" ] || return 1
    case $loc in http*) ;; *) loc=$UP$loc ;; esac
    sep='?'
    [[ $loc == *\?* ]] && sep='&'
    code=$(curl -sS -o /dev/null --max-time 120 -w '%{http_code}' -X PUT -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' -T "$file" "$loc${sep}digest=sha256:$hex")
    [ "$code" = 201 ]
}

declare -A HEX=()
make_blob() { # role
    local f=$T/gen.bin hex
    hex=$(head -c "$BLOB_BYTES" /dev/urandom | tee "$f" | sha256sum | cut -d' ' -f1)
    push_blob "$f" "$hex" || die "could not push blob $1 to the upstream"
    rm -f "$f"
    HEX[$1]=$hex
}
ROLES=(layer)
for ((i = 1; i <= COLD_RUNS; i++)); do ROLES+=("cold_rm_$i" "cold_ref_$i"); done
ROLES+=(fan_rm fan_ref)
say "seeding library/bench:latest and ${#ROLES[@]} random ${BLOB_MIB} MiB blobs"
for r in "${ROLES[@]}"; do make_blob "$r"; done

printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "${HEX[layer]}" >"$T/config.json"
CONFIG_HEX=$(sha256sum "$T/config.json" | cut -d' ' -f1)
push_blob "$T/config.json" "$CONFIG_HEX" || die "could not push the config blob"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
    "$CONFIG_HEX" "$(stat -c %s "$T/config.json")" "${HEX[layer]}" "$BLOB_BYTES" >"$T/manifest.json"
MANIFEST_DIGEST=sha256:$(sha256sum "$T/manifest.json" | cut -d' ' -f1)
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X PUT \
    -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary @"$T/manifest.json" \
    "$UP/v2/library/bench/manifests/latest")
[ "$code" = 201 ] || die "manifest push answered $code"

# The reference: distribution 2.8 as a pull-through cache (its defaults: info logs, access log).
cat >"$T/reference.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $T/ref
http:
  addr: 127.0.0.1:$P_REF
  secret: regmirror-bench-reference
proxy:
  remoteurl: $NGX
EOF
start_daemon reference "$LOG/reference.log" docker-registry serve "$T/reference.yml"

rm_config() { # file listen metrics [tls]
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"

[storage]
root = "$T/rm/data"

[[upstream]]
name = "docker.io"
url = "$NGX"

[cache]
tag_ttl = "5m"

[metrics]
listen = "127.0.0.1:$3"
EOF
    if [ "${4:-}" = tls ]; then
        printf '\n[tls]\nmode = "self-signed"\ndir = "%s"\n' "$T/rm/certs" >>"$1"
    fi
}
rm_config "$T/rm/plain.toml" "$P_RM" "$P_RMM"
start_daemon regmirror "$LOG/regmirror.log" "$BIN" serve --config "$T/rm/plain.toml"
wait_until 20 reference http_ok "$REF/v2/" || die "reference registry did not start: $(tail -5 "$LOG/reference.log")"
wait_until 20 regmirror http_ok "$RM/v2/" || die "regmirror did not start: $(tail -5 "$LOG/regmirror.log")"
wait_until 20 nginx http_ok "$STATIC/blobs/${HEX[layer]:0:2}/${HEX[layer]}/data" -r 0-0 ||
    die "nginx static cannot read the blob files: $(tail -3 "$LOG/nginx-error.log")"

blob_url() { echo "$1/v2/library/bench/blobs/sha256:$2"; } # base hex
static_url() { echo "$STATIC/blobs/${1:0:2}/$1/data"; }    # hex
upstream_count() { $PY "$LIB" upstream-count "$NGX_LOG" "$1"; } # hex -> "gets heads bytes"

# Content check: a digest-verified download (outside any timing).
verify() { # label url hex
    local got
    got=$(curl -sS --max-time 120 "$2" | sha256sum | cut -d' ' -f1)
    [ "$got" = "$3" ] || note "$1: content of $2 hashes to sha256:$got, expected sha256:$3"
}

# ---------------------------------------------------------------------------------------------
# 2. Cold pulls (each on a blob no mirror has seen) vs direct from the upstream
# ---------------------------------------------------------------------------------------------

say "cold pulls: direct / regmirror / reference, $COLD_RUNS round(s)"
# Direct: the layer blob, through the counting nginx (the path the mirrors take) and raw.
check_fetch() { # label expected-size "code size secs speed" url [curl args...]; echoes secs or ""
    local label=$1 size=$2 res=$3 url=$4
    shift 4
    read -r c s t _ <<<"$res"
    if [ "$c" = 200 ] && [ "$s" = "$size" ]; then
        echo "$t"
    else
        note "$label: got HTTP $c with $s of $size bytes in ${t}s"
        explain "$label (retry with headers)" "$url" "$@"
        echo ""
    fi
}
direct=() direct_raw=() verified=() cold_rm=() cold_ref=()
timed() { # label url : settle, then one checked download; echoes seconds or ""
    settle
    fg_begin
    local res
    res=$(fetch "$2")
    fg_end
    check_fetch "$1" "$BLOB_BYTES" "$res" "$2"
}
# The least any mirror that verifies a blob before its last byte must add: the same download,
# hashed on a second thread as it arrives (no disk, no second hop).
timed_verified() { # url hex : settle, then one verified download; echoes seconds or ""
    settle
    fg_begin
    local secs
    secs=$($PY "$LIB" verified-fetch "$1" "$2") || note "verified download of $1 failed or did not match $2"
    fg_end
    echo "$secs"
}
fetch "$(blob_url "$NGX" "${HEX[layer]}")" >/dev/null # warm the upstream's file cache path once
phase_begin cold
for ((i = 1; i <= COLD_RUNS; i++)); do
    direct+=("$(timed direct "$(blob_url "$NGX" "${HEX[layer]}")")")
    direct_raw+=("$(timed direct-raw "$(blob_url "$UP" "${HEX[layer]}")")")
    verified+=("$(timed_verified "$(blob_url "$NGX" "${HEX[layer]}")" "${HEX[layer]}")")
    cold_rm+=("$(timed "regmirror cold $i" "$(blob_url "$RM" "${HEX[cold_rm_$i]}")")")
    cold_ref+=("$(timed "reference cold $i" "$(blob_url "$REF" "${HEX[cold_ref_$i]}")")")
done
direct+=("$(timed direct "$(blob_url "$NGX" "${HEX[layer]}")")")
settle
phase_end
fig cpu_cold_rm "$(per "${CPU[rm]}" "$COLD_RUNS")"
fig cpu_cold_ref "$(per "${CPU[ref]}" "$COLD_RUNS")"
say "  direct ${direct[*]} | raw ${direct_raw[*]} | verified ${verified[*]} | regmirror ${cold_rm[*]} | reference ${cold_ref[*]}"
fig direct_s "$(median "${direct[@]}")"
fig direct_raw_s "$(median "${direct_raw[@]}")"
fig verified_s "$(median "${verified[@]}")"
fig cold_rm_s "$(median "${cold_rm[@]}")"
fig cold_ref_s "$(median "${cold_ref[@]}")"
for ((i = 1; i <= COLD_RUNS; i++)); do
    read -r g hd _ <<<"$(upstream_count "${HEX[cold_rm_$i]}")"
    [ "$g" = 1 ] || note "regmirror cold $i: $g upstream GETs (and $hd HEADs) for one blob"
    read -r g hd _ <<<"$(upstream_count "${HEX[cold_ref_$i]}")"
    fig "cold_ref_${i}_upstream" "$g GET, $hd HEAD"
done
cold_up_rm=$(upstream_count "${HEX[cold_rm_1]}")
cold_up_ref=$(upstream_count "${HEX[cold_ref_1]}")
note "upstream requests per cold pull (GET HEAD): regmirror ${cold_up_rm% *}, reference ${cold_up_ref% *}"

# ---------------------------------------------------------------------------------------------
# 3. Warm throughput: the first cold blob of each mirror, now cached; nginx static on a file
# ---------------------------------------------------------------------------------------------

say "warm throughput, $WARM_RUNS rounds"
WRM=$(blob_url "$RM" "${HEX[cold_rm_1]}")
WREF=$(blob_url "$REF" "${HEX[cold_ref_1]}")
WNGX=$(static_url "${HEX[cold_rm_1]}")
fetch "$WRM" >/dev/null
fetch "$WREF" >/dev/null
fetch "$WNGX" >/dev/null
warm_rm=() warm_ref=() warm_ngx=()
phase_begin warm
for ((i = 1; i <= WARM_RUNS; i++)); do
    for which in rm ref ngx; do
        case $which in rm) u=$WRM ;; ref) u=$WREF ;; ngx) u=$WNGX ;; esac
        settle
        fg_begin
        res=$(fetch "$u")
        fg_end
        read -r c s _ b <<<"$res"
        if [ "$c" = 200 ] && [ "$s" = "$BLOB_BYTES" ]; then
            eval "warm_$which+=(\"$b\")"
        else
            note "warm $which round $i: HTTP $c, $s of $BLOB_BYTES bytes"
        fi
    done
done
phase_end
fig cpu_warm_rm "$(per "${CPU[rm]}" "$WARM_RUNS")"
fig cpu_warm_ref "$(per "${CPU[ref]}" "$WARM_RUNS")"
fig warm_rm_mbs "$(mbs "$(median "${warm_rm[@]}")")"
fig warm_ref_mbs "$(mbs "$(median "${warm_ref[@]}")")"
fig warm_nginx_mbs "$(mbs "$(median "${warm_ngx[@]}")")"
say "  MB/s regmirror $(mbs "$(median "${warm_rm[@]}")") reference $(mbs "$(median "${warm_ref[@]}")") nginx $(mbs "$(median "${warm_ngx[@]}")")"
read -r g _ <<<"$(upstream_count "${HEX[cold_rm_1]}")"
[ "$g" = 1 ] || note "regmirror warm: upstream GETs for the cached blob rose to $g"
verify "regmirror warm" "$WRM" "${HEX[cold_rm_1]}"
verify "reference warm" "$WREF" "${HEX[cold_ref_1]}"

# ---------------------------------------------------------------------------------------------
# 4. Manifest by tag, wrk
# ---------------------------------------------------------------------------------------------

say "manifest by tag: wrk $WRK_ARGS"
MAN_PATH=/v2/library/bench/manifests/latest
for which in rm ref; do
    case $which in rm) base=$RM ;; ref) base=$REF ;; esac
    hdr=$(curl -sS -o "$T/man.$which" -D - --max-time 10 -H "Accept: $ACCEPT" "$base$MAN_PATH" | tr -d '\r')
    code=$(head -1 <<<"$hdr" | awk '{print $2}')
    dg=$(awk 'tolower($1) == "docker-content-digest:" { print $2 }' <<<"$hdr")
    if [ "$code" != 200 ] || ! cmp -s "$T/man.$which" "$T/manifest.json"; then
        note "manifest via $which: HTTP $code, digest '$dg', body differs from the pushed manifest: $(head -c 200 "$T/man.$which")"
    fi
    [ "$dg" = "$MANIFEST_DIGEST" ] || note "manifest via $which: Docker-Content-Digest '$dg', expected $MANIFEST_DIGEST"
    before=$(grep -c "manifests/latest\"" "$NGX_LOG")
    before_all=$(wc -l <"$NGX_LOG")
    settle
    phase_begin "man_$which"
    fg_begin
    timeout $((WRK_SECS + 30)) wrk $WRK_ARGS --latency -H "Accept: $ACCEPT" "$base$MAN_PATH" >"$LOG/wrk-$which.txt" 2>&1
    fg_end
    after=$(grep -c "manifests/latest\"" "$NGX_LOG")
    after_all=$(wc -l <"$NGX_LOG")
    fig "man_${which}_upstream_all" "$((after_all - before_all))"
    sed -n "$((before_all + 1)),${after_all}p" "$NGX_LOG" | awk '{ print $2, $3 }' | tr -d '"' |
        sort | uniq -c | sort -rn | awk '{ $1 = $1; print }' >"$LOG/upstream-during-wrk-$which.txt"
    phase_end
    read -r rps non2xx errs reqs <<<"$($PY "$LIB" wrk-parse "$LOG/wrk-$which.txt")"
    fig "man_${which}_rps" "$rps"
    fig "man_${which}_non2xx" "$non2xx"
    fig "man_${which}_errors" "$errs"
    fig "man_${which}_upstream" "$((after - before))"
    say "  $which: $rps req/s ($reqs requests, $non2xx non-2xx, $errs socket errors, $((after - before)) upstream requests)"
done
note "upstream requests during the manifest wrk runs (for the manifest / all paths): regmirror $(grep '^man_rm_upstream=' "$FIG" | cut -d= -f2) / $(grep '^man_rm_upstream_all=' "$FIG" | cut -d= -f2), reference $(grep '^man_ref_upstream=' "$FIG" | cut -d= -f2) / $(grep '^man_ref_upstream_all=' "$FIG" | cut -d= -f2) (reference: $(head -3 "$LOG/upstream-during-wrk-ref.txt" | tr '\n' ',' | sed 's/,$//; s/,/, /g'))"

# ---------------------------------------------------------------------------------------------
# 5. Fan-out: N concurrent clients on one uncached blob
# ---------------------------------------------------------------------------------------------

fanout() { # label url -> sets FAN_WALL, FAN_OK
    local label=$1 url=$2 i start end pids=()
    rm -f "$T/fan/$label".*
    settle
    phase_begin "fan_$label"
    fg_begin
    start=$(date +%s.%N)
    for ((i = 1; i <= FANOUT; i++)); do
        curl -sS -o /dev/null --max-time 180 -w '%{http_code} %{size_download} %{time_total}\n' "$url" \
            >"$T/fan/$label.$i" 2>>"$LOG/curl.err" &
        pids+=($!)
    done
    wait "${pids[@]}"
    end=$(date +%s.%N)
    fg_end
    settle # the reference keeps storing after its clients are served: count that CPU too
    phase_end
    FAN_WALL=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
    FAN_OK=$(cat "$T/fan/$label".* | awk -v n="$BLOB_BYTES" '$1 == 200 && $2 == n' | wc -l)
    if [ "$FAN_OK" != "$FANOUT" ]; then
        note "fan-out $label: only $FAN_OK of $FANOUT clients got 200 and $BLOB_BYTES bytes: $(cat "$T/fan/$label".* | sort | uniq -c | tr '\n' ';')"
    fi
    say "  $label: ${FAN_WALL}s, $FAN_OK/$FANOUT ok, per-client s: $(awk '{print $3}' "$T/fan/$label".* | sort -n | sed -n '1p;$p' | tr '\n' ' ')"
}

say "fan-out: $FANOUT clients"
fanout rm "$(blob_url "$RM" "${HEX[fan_rm]}")"
fig fan_rm_s "$FAN_WALL"
fig fan_rm_ok "$FAN_OK"
fig cpu_fan_rm "${CPU[rm]}"
fanout ref "$(blob_url "$REF" "${HEX[fan_ref]}")"
fig fan_ref_s "$FAN_WALL"
fig fan_ref_ok "$FAN_OK"
fig cpu_fan_ref "${CPU[ref]}"
fanout nginx "$(static_url "${HEX[fan_rm]}")"
fig fan_nginx_s "$FAN_WALL"
fig fan_nginx_ok "$FAN_OK"
fig cpu_fan_nginx "${CPU[ngx]}"
read -r g hd by <<<"$(upstream_count "${HEX[fan_rm]}")"
fig fan_rm_gets "$g"
fig fan_rm_up_mib "$(awk -v b="$by" 'BEGIN { printf "%.0f", b / 1048576 }')"
note "fan-out regmirror: $g upstream GET(s), $hd HEAD(s) for the blob"
read -r g hd by <<<"$(upstream_count "${HEX[fan_ref]}")"
fig fan_ref_gets "$g"
fig fan_ref_up_mib "$(awk -v b="$by" 'BEGIN { printf "%.0f", b / 1048576 }')"
note "fan-out reference: $g upstream GET(s), $hd HEAD(s) for the blob"
verify "regmirror fan-out blob" "$(blob_url "$RM" "${HEX[fan_rm]}")" "${HEX[fan_rm]}"
verify "reference fan-out blob" "$(blob_url "$REF" "${HEX[fan_ref]}")" "${HEX[fan_ref]}"

# ---------------------------------------------------------------------------------------------
# 6. Peak RSS
# ---------------------------------------------------------------------------------------------

alive regmirror || note "regmirror is no longer running: $(tail -3 "$LOG/regmirror.log")"
alive reference || note "reference is no longer running: $(tail -3 "$LOG/reference.log")"
fig rss_rm_mib "$(hwm "${PID[regmirror]}")"
fig rss_ref_mib "$(hwm "${PID[reference]}")"
say "  VmHWM regmirror $(hwm "${PID[regmirror]}") MiB, reference $(hwm "${PID[reference]}") MiB"
metric() { $PY "$LIB" metric "$@" 2>/dev/null || echo "?"; }
note "regmirror metrics: upstream requests $(metric "http://127.0.0.1:$P_RMM/metrics" regmirror_upstream_requests_total), upstream failures $(metric "http://127.0.0.1:$P_RMM/metrics" regmirror_upstream_failures_total)"
note "peak RSS (VmHWM, MiB) after each phase, regmirror / reference: $(for p in cold warm man_rm man_ref fan_rm fan_ref fan_nginx; do printf '%s %s/%s; ' "$p" "$(grep "^hwm_${p}_rm=" "$FIG" | cut -d= -f2)" "$(grep "^hwm_${p}_ref=" "$FIG" | cut -d= -f2)"; done)"
# Level is the second field of a text log line; `error=""` in a request line is not an error.
LEVELS='^[^ ]+ +(WARN|ERROR) '
ERRS=$(grep -cE "$LEVELS" "$LOG/regmirror.log")
[ "$ERRS" = 0 ] || note "regmirror logged $ERRS WARN/ERROR lines, e.g.: $(grep -E "$LEVELS" "$LOG/regmirror.log" | head -3)"
grep -q $'\x1b\\[' "$LOG/regmirror.log" && note "regmirror writes ANSI colour codes into its log even though stderr is a file, not a terminal"

# ---------------------------------------------------------------------------------------------
# 7. TLS: restart regmirror on the same store with [tls] mode = "self-signed"
# ---------------------------------------------------------------------------------------------

say "TLS: restarting regmirror with a self-signed certificate"
stop_daemon regmirror
rm_config "$T/rm/tls.toml" "$P_TLS" "$P_TLSM" tls
start_daemon regmirror_tls "$LOG/regmirror-tls.log" "$BIN" serve --config "$T/rm/tls.toml"
CA=$T/rm/certs/ca.crt
TLS=https://127.0.0.1:$P_TLS
if wait_until 30 regmirror_tls http_ok --cacert "$CA" "$TLS/v2/"; then
    TM=http://127.0.0.1:$P_TLSM/metrics
    hs0=$(metric "$TM" regmirror_tls_handshakes_total)
    hf0=$(metric "$TM" regmirror_tls_handshake_failures_total)
    settle
    phase_begin tls_hs
    timeout $((STIME_SECS + 30)) openssl s_time -connect "127.0.0.1:$P_TLS" -new -time "$STIME_SECS" \
        -CAfile "$CA" >"$LOG/s_time.txt" 2>&1
    phase_end
    hs1=$(metric "$TM" regmirror_tls_handshakes_total)
    hf1=$(metric "$TM" regmirror_tls_handshake_failures_total)
    read -r conns _ <<<"$($PY "$LIB" stime-parse "$LOG/s_time.txt")"
    # s_time's own "real seconds" is a whole number; use the measured wall time instead.
    fig tls_hs_per_s "$(per "$conns" "${CPU[wall]}")"
    delta() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%d", b - a; else print "?" }'; }
    fig tls_hs_metric "$(delta "$hs0" "$hs1")"
    fig tls_hs_failed "$(delta "$hf0" "$hf1")"
    fig tls_hs_cpu_ms "$(awk -v c="${CPU[rm]}" -v n="$conns" 'BEGIN { if (n > 0) printf "%.3f", 1000 * c / n }')"
    if [ "$(delta "$hf0" "$hf1")" != 0 ]; then
        note "TLS: regmirror counted $(delta "$hf0" "$hf1") of the $conns s_time connections as failed handshakes (regmirror_tls_handshake_failures_total). s_time closes each connection as soon as its side of the handshake is done; with RUST_LOG=debug regmirror logs these as 'TLS handshake failed ... Connection reset by peer' (its accept also flushes the TLS 1.3 session tickets, which meets the reset). The key exchange was done either way: the rate above counts every connection."
    fi
    say "  s_time: $conns handshakes in ${CPU[wall]}s; server counted $(delta "$hs0" "$hs1") completed, $(delta "$hf0" "$hf1") failed; regmirror CPU ${CPU[rm]}s"
    [ "$conns" != 0 ] || note "openssl s_time made no connections: $(tail -3 "$LOG/s_time.txt")"

    WTLS=$(blob_url "$TLS" "${HEX[cold_rm_1]}")
    fetch "$WTLS" --cacert "$CA" >/dev/null
    warm_tls=()
    phase_begin tls_warm
    for ((i = 1; i <= WARM_RUNS; i++)); do
        settle
        fg_begin
        res=$(fetch "$WTLS" --cacert "$CA")
        fg_end
        read -r c s _ b <<<"$res"
        if [ "$c" = 200 ] && [ "$s" = "$BLOB_BYTES" ]; then warm_tls+=("$b"); else note "TLS warm round $i: HTTP $c, $s bytes"; fi
    done
    phase_end
    fig cpu_warm_tls "$(per "${CPU[rm]}" "$WARM_RUNS")"
    fig warm_tls_mbs "$(mbs "$(median "${warm_tls[@]}")")"
    say "  warm TLS $(mbs "$(median "${warm_tls[@]}")") MB/s"
    read -r g _ <<<"$(upstream_count "${HEX[cold_rm_1]}")"
    [ "$g" = 1 ] || note "after the restart, regmirror fetched the cached blob again ($g upstream GETs in all)"

    settle
    phase_begin tls_man
    timeout $((WRK_SECS + 30)) wrk $WRK_ARGS -H "Accept: $ACCEPT" "$TLS$MAN_PATH" >"$LOG/wrk-tls.txt" 2>&1
    phase_end
    read -r rps non2xx errs _ <<<"$($PY "$LIB" wrk-parse "$LOG/wrk-tls.txt")"
    fig man_tls_rps "$rps"
    [ "$non2xx" = 0 ] && [ "$errs" = 0 ] || note "wrk over TLS: $non2xx non-2xx, $errs socket errors"
    say "  manifest over TLS: $rps req/s"
else
    note "regmirror with TLS did not answer on $TLS/v2/: $(tail -5 "$LOG/regmirror-tls.log")"
fi

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

fig total_seconds "$SECONDS"
fig settle_seconds "$(awk '{ s += $1 } END { printf "%.0f", s }' "$T/settle-spent" 2>/dev/null)"
note "waiting for quiet before measurements took $(grep '^settle_seconds=' "$FIG" | cut -d= -f2)s of the run (budget for waiting on other processes: ${SETTLE_BUDGET}s)"
note "CPU used by other processes during the timed windows of each phase (% of the machine): $(grep '^foreign_.*_pct=' "$FIG" | sed 's/^foreign_//; s/_pct=/ /' | tr '\n' ';' | sed 's/;/%; /g')"
note "whole run took ${SECONDS}s"
cp "$FIG" "$LOG/figures.txt"
$PY "$LIB" report "$FIG" "$RESULTS"
