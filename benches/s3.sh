#!/usr/bin/env bash
# regmirror on the object-store backend against the filesystem backend, in one run, on loopback.
#
#   benches/s3.sh
#
# Builds nothing: runs ${REGMIRROR_BIN:-target/release/regmirror} four times over, all mirroring
# one upstream (Debian's `docker-registry`, whose access log counts upstream GETs):
#   fs       storage.backend = "fs"
#   s3a/s3b  two replicas on one SeaweedFS bucket ([cluster] advertise)
#   redir    the same bucket (another prefix) with storage.s3.redirect = true
# SeaweedFS comes from ${REGMIRROR_WEED:-target/pyvenv/bin/weed} (tests/run.sh installs it).
#
# Measures, with curl as the client (time to the last byte, body discarded):
#   cold pull   a blob nobody has fetched yet, fs against s3 (the S3 figure includes the upload
#               into the bucket: the last byte is sent once the blob is stored)
#   warm pull   a stored blob: fs, s3 (through a replica), the same object straight from
#               SeaweedFS (signed with curl --aws-sigv4), the same through nginx (proxy_pass, as
#               a yardstick for what any proxy costs on the machine), and through the redirect;
#               with the time to the first byte and the CPU seconds of SeaweedFS and regmirror
#   fan-out     16 clients on one uncached blob: all on fs; 8 on each of the two replicas
#               (wall time, upstream GETs)
# Prints a table, with PASS/MISS for: warm through a replica >= 0.8x the direct GET; one upstream
# GET for the fan-out across replicas; the redirect instance serves 0 blob bytes. Writes it to
# benches/results-s3.txt.
#
# Environment: REGMIRROR_BIN, REGMIRROR_WEED, BENCH_BLOB_MIB [256], BENCH_WARM_RUNS [5],
# BENCH_COLD_RUNS [2], BENCH_FANOUT [16], BENCH_KEEP=1 (keep the temp dir).

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BIN=$(realpath "${REGMIRROR_BIN:-$REPO/target/release/regmirror}")
WEED=${REGMIRROR_WEED:-$REPO/target/pyvenv/bin/weed}
BLOB_MIB=${BENCH_BLOB_MIB:-256}
WARM_RUNS=${BENCH_WARM_RUNS:-5}
COLD_RUNS=${BENCH_COLD_RUNS:-2}
FANOUT=${BENCH_FANOUT:-16}
RESULTS=$HERE/results-s3.txt
LIB=$HERE/benchlib.py
PY=python3
BLOB_BYTES=$((BLOB_MIB * 1024 * 1024))
KEY=regmirror-bench
SECRET=regmirror-bench-secret-key
BUCKET=regmirror

say() { printf '[s3 bench %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { say "FATAL: $*"; exit 1; }

[ -x "$BIN" ] || die "no regmirror binary at $BIN (cargo build --release)"
[ -x "$WEED" ] || die "no SeaweedFS at $WEED (tests/run.sh installs it; or set REGMIRROR_WEED)"
command -v docker-registry >/dev/null || die "docker-registry is not installed (apt-get install docker-registry)"
curl --help all 2>/dev/null | grep -q -- --aws-sigv4 || die "curl without --aws-sigv4 (needs curl 7.75 or later)"

T=$(mktemp -d /tmp/regmirror-s3bench.XXXXXX)
declare -A PID=()
cleanup() {
    local p
    for p in "${PID[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null; done
    if [ "${BENCH_KEEP:-0}" = 1 ]; then say "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
start() { # name log command...
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    PID[$name]=$!
}
up() { # url: wait (bounded) until it answers
    local i
    for ((i = 0; i < 200; i++)); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    return 1
}
metric() { $PY "$LIB" metric "$@" 2>/dev/null || echo "?"; }
median() { $PY "$LIB" median "$@"; }
mbs() { awk -v b="$BLOB_BYTES" -v s="$1" 'BEGIN { if (s > 0) printf "%.0f", b / s / 1e6 }'; }
# GET, body discarded: prints seconds to the last byte; fails unless the status is 200. The time
# to the first byte goes to $T/ttfb.
timed_get() { # url [curl args...]
    local url=$1 out
    shift
    out=$(curl -sS -o /dev/null -w '%{http_code} %{time_total} %{time_starttransfer}' --max-time 600 "$@" "$url") || return 1
    read -r code total first <<<"$out"
    [ "$code" = 200 ] || [ "$code" = 206 ] || { say "GET $url answered $code"; return 1; }
    echo "$first" >>"$T/ttfb"
    echo "$total"
}

# Free ports below 55000 whose twins (port + 10000, SeaweedFS's gRPC ports) are free too.
mapfile -t P < <($PY - <<'PYEOF'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
picked = set()
while len(picked) < 17:
    p = random.randrange(20000, 55000)
    if p not in picked and p + 10000 not in picked and p - 10000 not in picked and free(p) and free(p + 10000):
        picked.add(p)
print("\n".join(map(str, picked)))
PYEOF
)
[ ${#P[@]} = 17 ] || die "could not find free ports"
P_UP=${P[0]} P_FS=${P[1]} P_A=${P[2]} P_B=${P[3]} P_R=${P[4]}
P_S3=${P[5]} P_MASTER=${P[6]} P_VOLUME=${P[7]} P_FILER=${P[8]} P_ADMIN=${P[9]} P_ICE=${P[10]} P_LANCE=${P[11]}
declare -A METRICS=([fs]=${P[12]} [s3a]=${P[13]} [s3b]=${P[14]} [redir]=${P[15]})
UP=http://127.0.0.1:$P_UP
S3=http://127.0.0.1:$P_S3

# ---- SeaweedFS ----
mkdir -p "$T/weed"
printf '%s\n' "$SECRET" >"$T/s3-secret"
AWS_ACCESS_KEY_ID=$KEY AWS_SECRET_ACCESS_KEY=$SECRET start weed "$T/weed.log" "$WEED" mini -dir="$T/weed" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -admin.ui=false -webdav=false -bucket=$BUCKET \
    -s3.port="$P_S3" -master.port="$P_MASTER" -volume.port="$P_VOLUME" -filer.port="$P_FILER" \
    -admin.port="$P_ADMIN" -s3.port.iceberg="$P_ICE" -s3.port.lance="$P_LANCE"
# curl signed for the bucket (SigV4), the secret in a config file rather than on the command line.
printf 'aws-sigv4 = "aws:amz:us-east-1:s3"\nuser = "%s:%s"\nheader = "x-amz-content-sha256: UNSIGNED-PAYLOAD"\n' \
    "$KEY" "$SECRET" >"$T/curl-s3.conf"
s3_ready() { # a signed PUT and GET succeed
    curl -sf -o /dev/null --max-time 2 -K "$T/curl-s3.conf" -X PUT --data-binary ready "$S3/$BUCKET/bench-ready" &&
        curl -sf -o /dev/null --max-time 2 -K "$T/curl-s3.conf" "$S3/$BUCKET/bench-ready"
}
for ((i = 0; i < 600; i++)); do s3_ready && break; sleep 0.1; done
s3_ready || die "SeaweedFS did not come up: $(tail -5 "$T/weed.log")"

# ---- nginx as a plain reverse proxy in front of SeaweedFS: what any proxy costs here ----
P_NGX=${P[16]}
for d in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$T/nginx/$d"; done
NGX_USER=
[ "$(id -u)" = 0 ] && NGX_USER="user root;" # workers must read the 0700 temp dir
cat >"$T/nginx/nginx.conf" <<EOF
$NGX_USER
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $T/nginx/client_body;
    proxy_temp_path $T/nginx/proxy;
    fastcgi_temp_path $T/nginx/fastcgi;
    uwsgi_temp_path $T/nginx/uwsgi;
    scgi_temp_path $T/nginx/scgi;
    server {
        listen 127.0.0.1:$P_NGX;
        location / {
            proxy_pass http://127.0.0.1:$P_S3;
            proxy_set_header Host \$http_host;
            proxy_http_version 1.1;
            proxy_max_temp_file_size 0;
        }
    }
}
EOF
start nginx "$T/nginx.log" nginx -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;'

# ---- the upstream, with an access log ----
cat >"$T/upstream.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $T/up
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$P_UP
  secret: regmirror-s3-bench
EOF
start upstream "$T/upstream.log" docker-registry serve "$T/upstream.yml"
up "$UP/v2/" || die "docker-registry did not start: $(tail -5 "$T/upstream.log")"

push_blob() { # file hex
    local loc sep
    loc=$(curl -sS -o /dev/null -D - -X POST "$UP/v2/library/bench/blobs/uploads/" |
        awk 'tolower($1) == "location:" { print $2 }' | tr -d '\r')
    case $loc in http*) ;; *) loc=$UP$loc ;; esac
    sep='?'
    [[ $loc == *\?* ]] && sep='&'
    [ "$(curl -sS -o /dev/null -w '%{http_code}' -X PUT -H 'Expect:' -T "$1" "$loc${sep}digest=sha256:$2")" = 201 ]
}
declare -A HEX=()
ROLES=(warm fan_fs fan_s3)
for ((i = 1; i <= COLD_RUNS; i++)); do ROLES+=("cold_fs_$i" "cold_s3_$i"); done
say "seeding ${#ROLES[@]} random $BLOB_MIB MiB blobs into the upstream"
for r in "${ROLES[@]}"; do
    HEX[$r]=$(head -c "$BLOB_BYTES" /dev/urandom | tee "$T/gen.bin" | sha256sum | cut -d' ' -f1)
    push_blob "$T/gen.bin" "${HEX[$r]}" || die "could not push a blob to the upstream"
done
rm -f "$T/gen.bin"
upstream_gets() { grep -c "\"GET /v2/library/bench/blobs/sha256:$1" "$T/upstream.log"; }

# ---- the four regmirrors ----
s3_section() { # prefix
    printf '[storage.s3]\nbucket = "%s"\nendpoint = "%s"\nregion = "us-east-1"\nprefix = "%s"\naccess_key_id = "%s"\nsecret_access_key_file = "%s"\n' \
        "$BUCKET" "$S3" "$1" "$KEY" "$T/s3-secret"
}
mirror() { # name port storage-toml
    mkdir -p "$T/$1"
    printf '[server]\nlisten = "127.0.0.1:%s"\n%s\n[[upstream]]\nname = "docker.io"\nurl = "%s"\n[metrics]\nlisten = "127.0.0.1:%s"\n' \
        "$2" "$3" "$UP" "${METRICS[$1]}" >"$T/$1/mirror.toml"
    RUST_LOG=warn start "$1" "$T/$1.log" "$BIN" serve --config "$T/$1/mirror.toml"
    up "http://127.0.0.1:$2/healthz" || die "$1 did not start: $(tail -5 "$T/$1.log")"
}
mirror fs "$P_FS" "[storage]
root = \"$T/fs/data\""
for r in a:$P_A b:$P_B; do
    mirror "s3${r%%:*}" "${r#*:}" "[storage]
root = \"$T/s3${r%%:*}/data\"
backend = \"s3\"
$(s3_section bench)
[cluster]
advertise = \"http://127.0.0.1:${r#*:}\""
done
mirror redir "$P_R" "[storage]
root = \"$T/redir/data\"
backend = \"s3\"
$(s3_section redirect)
redirect = true"
blob_url() { echo "http://127.0.0.1:$1/v2/library/bench/blobs/sha256:$2"; }

declare -A FIG=()
# ---- cold ----
say "cold pulls"
for b in fs s3; do
    port=$P_FS
    [ $b = s3 ] && port=$P_A
    times=()
    for ((i = 1; i <= COLD_RUNS; i++)); do
        sync
        times+=("$(timed_get "$(blob_url "$port" "${HEX[cold_${b}_$i]}")")") || die "cold pull on $b failed"
    done
    FIG[cold_$b]=$(median "${times[@]}")
done

# ---- warm ----
say "warm pulls"
timed_get "$(blob_url "$P_FS" "${HEX[warm]}")" >/dev/null || die "warming fs failed"
timed_get "$(blob_url "$P_A" "${HEX[warm]}")" >/dev/null || die "warming s3 failed"
timed_get "$(blob_url "$P_R" "${HEX[warm]}")" >/dev/null || die "warming the redirect instance failed"
key="bench/blobs/sha256/${HEX[warm]:0:2}/${HEX[warm]}/data"
direct=(-K "$T/curl-s3.conf")
redirect_cache_before=$(metric "http://127.0.0.1:${METRICS[redir]}/metrics" regmirror_served_bytes_total source=cache)
# CPU seconds used by SeaweedFS, by the mirror measured, and by everything else of this script
# (curl) during each warm series: on a small machine the three compete for the cores.
cpu_snap() { $PY "$LIB" cpu-snap $$ "weed=${PID[weed]}" "fs=${PID[fs]}" "s3a=${PID[s3a]}" "redir=${PID[redir]}" "up=${PID[upstream]}" "b=${PID[s3b]}"; }
declare -A CPU=()
declare -A TTFB=()
for what in fs s3 direct nginx redirect; do
    snap0=$(cpu_snap)
    : >"$T/ttfb"
    times=()
    for ((i = 1; i <= WARM_RUNS; i++)); do
        case $what in
        fs) t=$(timed_get "$(blob_url "$P_FS" "${HEX[warm]}")") ;;
        s3) t=$(timed_get "$(blob_url "$P_A" "${HEX[warm]}")") ;;
        direct) t=$(timed_get "$S3/$BUCKET/$key" "${direct[@]}") ;;
        nginx) t=$(timed_get "http://127.0.0.1:$P_NGX/$BUCKET/$key" "${direct[@]}") ;;
        redirect) t=$(timed_get "$(blob_url "$P_R" "${HEX[warm]}")" -L) ;;
        esac
        [ -n "$t" ] || die "warm pull ($what) failed"
        times+=("$t")
    done
    FIG[warm_$what]=$(median "${times[@]}")
    TTFB[$what]=$(median $(cat "$T/ttfb"))
    declare -A d=()
    for kv in $($PY "$LIB" cpu-diff "$snap0" "$(cpu_snap)"); do d[${kv%%=*}]=${kv#*=}; done
    case $what in fs) mine=${d[fs]} ;; s3) mine=${d[s3a]} ;; redirect) mine=${d[redir]} ;; *) mine=0 ;; esac
    rest=$(awk -v w="${d[wall]}" 'BEGIN { printf "%.2f", w }')
    CPU[$what]="weed ${d[weed]}, regmirror $mine, wall ${rest}"
    unset d
done
redirect_cache_after=$(metric "http://127.0.0.1:${METRICS[redir]}/metrics" regmirror_served_bytes_total source=cache)
redirects=$(metric "http://127.0.0.1:${METRICS[redir]}/metrics" regmirror_blob_redirects_total)

# ---- fan-out ----
fan() { # role port...: FANOUT clients spread over the ports; prints the wall time
    local role=$1 start end i n=0 pids=()
    shift
    local ports=("$@")
    start=$(date +%s.%N)
    for ((i = 0; i < FANOUT; i++)); do
        curl -sS -o /dev/null --max-time 600 "$(blob_url "${ports[$((i % ${#ports[@]}))]}" "${HEX[$role]}")" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || n=$((n + 1)); done
    end=$(date +%s.%N)
    [ $n = 0 ] || say "$n fan-out clients failed"
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}
say "fan-out: $FANOUT clients on fs, then $FANOUT over the two replicas"
sync
FIG[fan_fs]=$(fan fan_fs "$P_FS")
sync
FIG[fan_s3]=$(fan fan_s3 "$P_A" "$P_B")
FIG[fan_fs_gets]=$(upstream_gets "${HEX[fan_fs]}")
FIG[fan_s3_gets]=$(upstream_gets "${HEX[fan_s3]}")
relayed=$(awk -v a="$(metric "http://127.0.0.1:${METRICS[s3a]}/metrics" regmirror_cluster_relayed_bytes_total)" \
    -v b="$(metric "http://127.0.0.1:${METRICS[s3b]}/metrics" regmirror_cluster_relayed_bytes_total)" 'BEGIN { printf "%.0f", a + b }')

# ---- the table ----
ratio=$(awk -v a="${FIG[warm_s3]}" -v b="${FIG[warm_direct]}" 'BEGIN { if (a > 0) printf "%.2f", b / a }')
pass() { if [ "$1" = 1 ]; then echo PASS; else echo MISS; fi; }
{
    echo "regmirror, S3 (SeaweedFS) against the filesystem: $(date -u '+%F %T UTC'), $(nproc) CPUs, blob $BLOB_MIB MiB"
    echo "binary $BIN ($(date -r "$BIN" '+%F %T'))"
    printf '%-44s %10s %10s\n' "" "seconds" "MB/s"
    printf '%-44s %10s %10s\n' "cold pull, fs (median of $COLD_RUNS)" "${FIG[cold_fs]}" "$(mbs "${FIG[cold_fs]}")"
    printf '%-44s %10s %10s\n' "cold pull, s3 (stored in the bucket at the end)" "${FIG[cold_s3]}" "$(mbs "${FIG[cold_s3]}")"
    printf '%-44s %10s %10s\n' "warm pull, fs (median of $WARM_RUNS)" "${FIG[warm_fs]}" "$(mbs "${FIG[warm_fs]}")"
    printf '%-44s %10s %10s\n' "warm pull, s3 through a replica" "${FIG[warm_s3]}" "$(mbs "${FIG[warm_s3]}")"
    printf '%-44s %10s %10s\n' "warm, the same object straight from SeaweedFS" "${FIG[warm_direct]}" "$(mbs "${FIG[warm_direct]}")"
    printf '%-44s %10s %10s\n' "warm, the same through nginx (proxy_pass)" "${FIG[warm_nginx]}" "$(mbs "${FIG[warm_nginx]}")"
    printf '%-44s %10s %10s\n' "warm pull, s3 with redirect (curl -L)" "${FIG[warm_redirect]}" "$(mbs "${FIG[warm_redirect]}")"
    for what in fs s3 direct nginx redirect; do
        printf '  %s: first byte after %s s (median); CPU seconds over the %d warm pulls: %s\n' "$what" "${TTFB[$what]}" "$WARM_RUNS" "${CPU[$what]}"
    done
    printf '%-44s %10s %10s\n' "fan-out $FANOUT clients, fs: wall" "${FIG[fan_fs]}" "upstream GETs ${FIG[fan_fs_gets]}"
    printf '%-44s %10s %10s\n' "fan-out $FANOUT clients on two s3 replicas: wall" "${FIG[fan_s3]}" "upstream GETs ${FIG[fan_s3_gets]}"
    echo
    echo "$(pass "$(awk -v r="$ratio" 'BEGIN { print (r >= 0.8) }')")  warm through a replica is ${ratio}x the direct GET (target >= 0.8x)"
    echo "$(pass "$([ "${FIG[fan_s3_gets]}" = 1 ] && echo 1)")  fan-out across two replicas: ${FIG[fan_s3_gets]} upstream GET(s) (target 1); $relayed bytes went from the fill's replica to the other"
    echo "$(pass "$([ "$redirect_cache_before" = "$redirect_cache_after" ] && echo 1)")  redirect: $redirects redirects, blob bytes served by the replica from the store: $(awk -v a="$redirect_cache_before" -v b="$redirect_cache_after" 'BEGIN { print b - a }') (target 0)"
} | tee "$RESULTS"
