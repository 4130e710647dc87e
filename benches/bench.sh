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
#   BENCH_KEEP=1  keep the temp dir (logs, configs, nginx access log)
#   RUST_LOG      passed to regmirror (unset: its default, info — one line per request)

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

T=$(mktemp -d /tmp/regmirror-bench.XXXXXX)
LOG=$T/logs
FIG=$T/figures
mkdir -p "$LOG" "$T/nginx" "$T/up" "$T/ref" "$T/rm" "$T/fan"
: >"$FIG"
fig() { printf '%s=%s\n' "$1" "$2" >>"$FIG"; }
NOTE_N=0
note() { NOTE_N=$((NOTE_N + 1)); fig "$(printf 'note%02d' "$NOTE_N")" "$*"; say "note: $*"; }

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
fig bin "$BIN"
fig bin_mtime "$(date -r "$BIN" '+%F %T')"
fig ref_version "$(docker-registry --version 2>&1 | awk '{print $NF}')"
fig nginx_version "$(nginx -v 2>&1 | sed 's|.*/||')"
fig cpus "$(nproc)"
fig mem "$(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
fig blob_mib "$BLOB_MIB"
fig cold_runs "$COLD_RUNS"
fig warm_runs "$WARM_RUNS"
fig fanout "$FANOUT"
fig wrk_args "$WRK_ARGS"
say "temp dir $T; binary $BIN"

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
direct=() direct_raw=() cold_rm=() cold_ref=()
fetch "$(blob_url "$NGX" "${HEX[layer]}")" >/dev/null # warm the upstream's file cache path once
for ((i = 1; i <= COLD_RUNS; i++)); do
    direct+=("$(check_fetch direct "$BLOB_BYTES" "$(fetch "$(blob_url "$NGX" "${HEX[layer]}")")" "$(blob_url "$NGX" "${HEX[layer]}")")")
    direct_raw+=("$(check_fetch direct-raw "$BLOB_BYTES" "$(fetch "$(blob_url "$UP" "${HEX[layer]}")")" "$(blob_url "$UP" "${HEX[layer]}")")")
    h=${HEX[cold_rm_$i]}
    cold_rm+=("$(check_fetch "regmirror cold $i" "$BLOB_BYTES" "$(fetch "$(blob_url "$RM" "$h")")" "$(blob_url "$RM" "$h")")")
    h=${HEX[cold_ref_$i]}
    cold_ref+=("$(check_fetch "reference cold $i" "$BLOB_BYTES" "$(fetch "$(blob_url "$REF" "$h")")" "$(blob_url "$REF" "$h")")")
done
direct+=("$(check_fetch direct "$BLOB_BYTES" "$(fetch "$(blob_url "$NGX" "${HEX[layer]}")")" "$(blob_url "$NGX" "${HEX[layer]}")")")
say "  direct ${direct[*]} | raw ${direct_raw[*]} | regmirror ${cold_rm[*]} | reference ${cold_ref[*]}"
fig direct_s "$(median "${direct[@]}")"
fig direct_raw_s "$(median "${direct_raw[@]}")"
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
sleep 1 # let a mirror finish committing what it just fetched
WRM=$(blob_url "$RM" "${HEX[cold_rm_1]}")
WREF=$(blob_url "$REF" "${HEX[cold_ref_1]}")
WNGX=$(static_url "${HEX[cold_rm_1]}")
fetch "$WRM" >/dev/null
fetch "$WREF" >/dev/null
fetch "$WNGX" >/dev/null
warm_rm=() warm_ref=() warm_ngx=()
for ((i = 1; i <= WARM_RUNS; i++)); do
    for which in rm ref ngx; do
        case $which in rm) u=$WRM ;; ref) u=$WREF ;; ngx) u=$WNGX ;; esac
        res=$(fetch "$u")
        read -r c s _ b <<<"$res"
        if [ "$c" = 200 ] && [ "$s" = "$BLOB_BYTES" ]; then
            eval "warm_$which+=(\"$b\")"
        else
            note "warm $which round $i: HTTP $c, $s of $BLOB_BYTES bytes"
        fi
    done
done
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
    timeout $((WRK_SECS + 30)) wrk $WRK_ARGS --latency -H "Accept: $ACCEPT" "$base$MAN_PATH" >"$LOG/wrk-$which.txt" 2>&1
    after=$(grep -c "manifests/latest\"" "$NGX_LOG")
    read -r rps non2xx errs reqs <<<"$($PY "$LIB" wrk-parse "$LOG/wrk-$which.txt")"
    fig "man_${which}_rps" "$rps"
    fig "man_${which}_non2xx" "$non2xx"
    fig "man_${which}_errors" "$errs"
    fig "man_${which}_upstream" "$((after - before))"
    say "  $which: $rps req/s ($reqs requests, $non2xx non-2xx, $errs socket errors, $((after - before)) upstream requests)"
done
note "manifest upstream requests during wrk: regmirror $(grep '^man_rm_upstream=' "$FIG" | cut -d= -f2), reference $(grep '^man_ref_upstream=' "$FIG" | cut -d= -f2)"

# ---------------------------------------------------------------------------------------------
# 5. Fan-out: N concurrent clients on one uncached blob
# ---------------------------------------------------------------------------------------------

fanout() { # label url -> sets FAN_WALL, FAN_OK
    local label=$1 url=$2 i start end pids=()
    rm -f "$T/fan/$label".*
    start=$(date +%s.%N)
    for ((i = 1; i <= FANOUT; i++)); do
        curl -sS -o /dev/null --max-time 180 -w '%{http_code} %{size_download} %{time_total}\n' "$url" \
            >"$T/fan/$label.$i" 2>>"$LOG/curl.err" &
        pids+=($!)
    done
    wait "${pids[@]}"
    end=$(date +%s.%N)
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
sleep 1
fanout ref "$(blob_url "$REF" "${HEX[fan_ref]}")"
fig fan_ref_s "$FAN_WALL"
fig fan_ref_ok "$FAN_OK"
sleep 1
fanout nginx "$(static_url "${HEX[fan_rm]}")"
fig fan_nginx_s "$FAN_WALL"
fig fan_nginx_ok "$FAN_OK"
sleep 1 # requests still logged after the last byte
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

hwm() { awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null; }
alive regmirror || note "regmirror is no longer running: $(tail -3 "$LOG/regmirror.log")"
alive reference || note "reference is no longer running: $(tail -3 "$LOG/reference.log")"
fig rss_rm_mib "$(hwm "${PID[regmirror]}")"
fig rss_ref_mib "$(hwm "${PID[reference]}")"
say "  VmHWM regmirror $(hwm "${PID[regmirror]}") MiB, reference $(hwm "${PID[reference]}") MiB"
metric() { $PY "$LIB" metric "$@" 2>/dev/null || echo "?"; }
note "regmirror metrics: upstream requests $(metric "http://127.0.0.1:$P_RMM/metrics" regmirror_upstream_requests_total), upstream failures $(metric "http://127.0.0.1:$P_RMM/metrics" regmirror_upstream_failures_total)"
ERRS=$(grep -ciE '\b(ERROR|WARN)\b' "$LOG/regmirror.log")
[ "$ERRS" = 0 ] || note "regmirror logged $ERRS WARN/ERROR lines, e.g.: $(grep -iE '\b(ERROR|WARN)\b' "$LOG/regmirror.log" | head -3 | tr '\n' ' ')"

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
    timeout $((STIME_SECS + 30)) openssl s_time -connect "127.0.0.1:$P_TLS" -new -time "$STIME_SECS" \
        -CAfile "$CA" >"$LOG/s_time.txt" 2>&1
    hs1=$(metric "$TM" regmirror_tls_handshakes_total)
    read -r conns secs <<<"$($PY "$LIB" stime-parse "$LOG/s_time.txt")"
    fig tls_hs_per_s "$(awk -v c="$conns" -v s="$secs" 'BEGIN { if (s > 0) printf "%.1f", c / s }')"
    fig tls_hs_metric "$(awk -v a="$hs0" -v b="$hs1" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/) printf "%d", b - a; else print "?" }')"
    say "  s_time: $conns handshakes in $secs s (server counted $(grep '^tls_hs_metric=' "$FIG" | cut -d= -f2))"
    [ "$conns" != 0 ] || note "openssl s_time made no connections: $(tail -3 "$LOG/s_time.txt" | tr '\n' ' ')"

    WTLS=$(blob_url "$TLS" "${HEX[cold_rm_1]}")
    fetch "$WTLS" --cacert "$CA" >/dev/null
    warm_tls=()
    for ((i = 1; i <= WARM_RUNS; i++)); do
        read -r c s _ b <<<"$(fetch "$WTLS" --cacert "$CA")"
        if [ "$c" = 200 ] && [ "$s" = "$BLOB_BYTES" ]; then warm_tls+=("$b"); else note "TLS warm round $i: HTTP $c, $s bytes"; fi
    done
    fig warm_tls_mbs "$(mbs "$(median "${warm_tls[@]}")")"
    say "  warm TLS $(mbs "$(median "${warm_tls[@]}")") MB/s"
    read -r g _ <<<"$(upstream_count "${HEX[cold_rm_1]}")"
    [ "$g" = 1 ] || note "after the restart, regmirror fetched the cached blob again ($g upstream GETs in all)"

    timeout $((WRK_SECS + 30)) wrk $WRK_ARGS -H "Accept: $ACCEPT" "$TLS$MAN_PATH" >"$LOG/wrk-tls.txt" 2>&1
    read -r rps non2xx errs _ <<<"$($PY "$LIB" wrk-parse "$LOG/wrk-tls.txt")"
    fig man_tls_rps "$rps"
    [ "$non2xx" = 0 ] && [ "$errs" = 0 ] || note "wrk over TLS: $non2xx non-2xx, $errs socket errors"
    say "  manifest over TLS: $rps req/s"
else
    note "regmirror with TLS did not answer on $TLS/v2/: $(tail -5 "$LOG/regmirror-tls.log" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

fig total_seconds "$SECONDS"
note "whole run took ${SECONDS}s"
cp "$FIG" "$LOG/figures.txt"
$PY "$LIB" report "$FIG" "$RESULTS"
