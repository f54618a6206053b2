#!/usr/bin/env bash
# Recovery space on S3 (issue 5): the same operations on a folder space and on an
# S3 space served by moto_server on loopback, with the S3 requests of each operation
# counted from moto's request log.
#
#   flock /tmp/cairn-bench.lock bash bench/s3.sh
#   SIZE_MIB=1024 DATA_FRAC=0.5 CHANGE=0.05 CHANGE_BLOCK=4194304 RUNS=3 PORT=19560
#   CAIRN=target/release/cairn (copied into the work dir at the start)
#
# Image: SIZE_MIB of 1 MiB regions; DATA_FRAC of them hold data (half PRNG bytes,
# half text-like lines of words), the rest are holes. Incremental: CHANGE of the image
# overwritten with PRNG bytes in CHANGE_BLOCK blocks at seeded aligned offsets
# (bench/make-image.py mutate). Each round starts a fresh moto_server (in memory) and
# fresh spaces; every restore and every hydrated clone is compared byte for byte.
# Results: $WORK/results.md (tables) and $WORK/raw.tsv (every round).
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
DATA_FRAC=${DATA_FRAC:-0.5}
CHANGE=${CHANGE:-0.05}
CHANGE_BLOCK=${CHANGE_BLOCK:-4194304}
RUNS=${RUNS:-3}
PORT=${PORT:-19560}
BUCKET=${BUCKET:-cairn-bench}
WORK=${WORK:-$HERE/work/s3}
SRC_CAIRN=${CAIRN:-$ROOT/target/release/cairn}

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-bench} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-bench}
export AWS_DEFAULT_REGION=us-east-1

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
for t in moto_server curl jq python3 cmp; do
    command -v "$t" >/dev/null || { echo "missing tool: $t" >&2; exit 1; }
done

mkdir -p "$WORK"
cd "$WORK"
cp "$SRC_CAIRN" ./cairn
CAIRN="$WORK/cairn"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD)

# ---- the image -----------------------------------------------------------------
BASE="base-${SIZE_MIB}M-${DATA_FRAC}.img"
if [[ ! -f $BASE ]]; then
    log "making $BASE"
    python3 - "$BASE" "$SIZE_MIB" "$DATA_FRAC" <<'EOF'
import random, sys
path, size_mib, frac = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
MiB = 1 << 20
rng = random.Random(5)
words = ("disk volume snapshot backup restore chunk block sector image point space "
         "server network kernel driver memory cache buffer queue thread process file "
         "the of and to in is for on that with as by at from this be are was it or an "
         "error warning info debug request response timeout retry latency").split()
slots = sorted(rng.sample(range(size_mib), int(size_mib * frac)))
with open(path + ".tmp", "wb") as f:
    f.truncate(size_mib * MiB)
    for i, s in enumerate(slots):
        if i % 2 == 0:
            data = rng.randbytes(MiB)
        else:
            out, n = [], 0
            while n < MiB:
                line = "%08d %s\n" % (rng.randrange(10**8), " ".join(rng.choices(words, k=12)))
                out.append(line); n += len(line)
            data = "".join(out).encode()[:MiB]
        f.seek(s * MiB); f.write(data)
import os; os.rename(path + ".tmp", path)
EOF
fi
if [[ ! -f changed.img || changed.img -ot $BASE ]]; then
    cp --sparse=always "$BASE" changed.img.tmp
    python3 "$HERE/make-image.py" mutate changed.img.tmp --fraction "$CHANGE" --block "$CHANGE_BLOCK" --seed 11 >&2
    mv changed.img.tmp changed.img
fi

# ---- moto ----------------------------------------------------------------------
MOTO_PID=
MOTO_LOG=
start_moto() {   # $1: log file
    MOTO_LOG=$1
    : >"$MOTO_LOG"
    moto_server -H 127.0.0.1 -p "$PORT" >>"$MOTO_LOG" 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
        sleep 0.1
    done
    curl -sf -X PUT "http://127.0.0.1:$PORT/$BUCKET" >/dev/null
}
stop_moto() {
    if [[ -n $MOTO_PID ]]; then
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
        MOTO_PID=
    fi
}
trap stop_moto EXIT

# Lines of the moto log so far (request lines are written after each response).
mark() { sleep 0.3; wc -l <"$MOTO_LOG"; }
# Requests in log lines ($1, $2]: "PUT GET HEAD LIST POST DELETE total".
count_requests() {
    sed -n "$(($1 + 1)),$2p" "$MOTO_LOG" | python3 -c '
import re, sys
c = dict.fromkeys(["PUT", "GET", "HEAD", "LIST", "POST", "DELETE"], 0)
for line in sys.stdin:
    m = re.search(r"\"(PUT|GET|HEAD|POST|DELETE) (\S+) HTTP", line)
    if not m:
        continue
    meth, path = m.groups()
    if meth == "GET" and "list-type=" in path:
        meth = "LIST"
    c[meth] += 1
print(" ".join(str(c[k]) for k in c), sum(c.values()))'
}
# Objects under the space's prefix ($1), through ListObjectsV2 pages.
count_objects() {
    python3 - "http://127.0.0.1:$PORT/$BUCKET" "$1/" <<'EOF'
import sys, urllib.parse, urllib.request, re
base, prefix = sys.argv[1], sys.argv[2]
n, token = 0, None
while True:
    q = {"list-type": "2", "prefix": prefix}
    if token: q["continuation-token"] = token
    body = urllib.request.urlopen(base + "?" + urllib.parse.urlencode(q)).read().decode()
    n += len(re.findall(r"<Key>", body))
    m = re.search(r"<NextContinuationToken>([^<]+)<", body)
    if "<IsTruncated>true" not in body or not m: break
    token = m.group(1)
print(n)
EOF
}

now() { date +%s.%N; }
# Runs "$@" and prints its wall time in seconds.
timed() {
    local t0 t1
    t0=$(now)
    "$@" >/dev/null
    t1=$(now)
    python3 -c "print('%.2f' % ($t1 - $t0))"
}

RAW=raw.tsv
printf 'round\tbackend\top\tseconds\tPUT\tGET\tHEAD\tLIST\tPOST\tDELETE\trequests\n' >"$RAW"
OBJ=objects.tsv
printf 'round\tbackend\tobjects_after_full\n' >"$OBJ"
record() {   # round backend op seconds [counts...]
    local r=$1 b=$2 op=$3 s=$4; shift 4
    local counts=${*:-"- - - - - - -"}
    printf '%s\t%s\t%s\t%s\t%s\n' "$r" "$b" "$op" "$s" "$(tr ' ' '\t' <<<"$counts")" >>"$RAW"
    log "round $r $b $op: ${s} s ${counts}"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u '+%Y-%m-%d %H:%M')
log "cairn $COMMIT, SIZE_MIB=$SIZE_MIB RUNS=$RUNS, load $LOAD_START"

for r in $(seq "$RUNS"); do
    for backend in fs s3; do
        d="r$r-$backend"
        rm -rf "$d"
        mkdir -p "$d"
        if [[ $backend == s3 ]]; then
            start_moto "$WORK/$d/moto.log"
            SPACE="s3://$BUCKET/space-$r?endpoint=http://127.0.0.1:$PORT&region=us-east-1"
        else
            SPACE="$WORK/$d/space"
        fi
        "$CAIRN" space init "$SPACE" >/dev/null
        cp --sparse=always "$BASE" "$d/disk.img"
        sync

        phase() {   # op cmd...
            local op=$1; shift
            local a b s
            [[ $backend == s3 ]] && a=$(mark)
            s=$(timed "$@")
            if [[ $backend == s3 ]]; then
                b=$(mark)
                record "$r" "$backend" "$op" "$s" "$(count_requests "$a" "$b")"
            else
                record "$r" "$backend" "$op" "$s"
            fi
        }

        phase full "$CAIRN" point create "$SPACE" "$d/disk.img" --disk disk -q
        if [[ $backend == s3 ]]; then
            printf '%s\ts3\t%s\n' "$r" "$(count_objects "space-$r")" >>"$OBJ"
        else
            printf '%s\tfs\t%s\n' "$r" "$(find "$SPACE" -type f | wc -l)" >>"$OBJ"
        fi

        cp --sparse=always changed.img "$d/disk.img"
        sync
        phase incr "$CAIRN" point create "$SPACE" "$d/disk.img" --disk disk --parent latest -q

        rm -f "$d/out.img"
        phase restore "$CAIRN" point restore "$SPACE" latest "$d/out.img" -q
        cmp "$d/out.img" changed.img
        rm -f "$d/out.img"

        # Clone hydration: a pool whose location's space is SPACE.
        if ! "$CAIRN" pool init "$d/pool" --space "$SPACE" >/dev/null 2>"$d/pool-init.err"; then
            # cairn at d4780a0: `pool init --space s3://...` fails (it canonicalizes the
            # space as a path). Workaround: a pool made on a folder space, then pointed
            # at the S3 space (pool.json: space, space_id), which the pool opens with
            # the same open_location as every other command.
            [[ $backend == s3 ]] || { cat "$d/pool-init.err" >&2; exit 1; }
            log "pool init on S3 failed ($(head -c 120 "$d/pool-init.err")); pool.json workaround"
            rm -rf "$d/pool"
            "$CAIRN" space init "$d/dummy-space" >/dev/null
            "$CAIRN" pool init "$d/pool" --space "$d/dummy-space" >/dev/null
            id=$("$CAIRN" space info "$SPACE" --json | jq -r .config.id)
            jq --arg s "$SPACE" --arg i "$id" '.space = $s | .space_id = $i' \
                "$d/pool/pool.json" >"$d/pool/pool.json.new"
            mv "$d/pool/pool.json.new" "$d/pool/pool.json"
            echo "pool.json workaround" >"$d/pool-workaround"
        fi
        "$CAIRN" server create "$d/pool" s >/dev/null
        phase clone "$CAIRN" disk clone "$d/pool" latest s/d --from-disk disk
        phase hydrate "$CAIRN" disk hydrate "$d/pool" s/d -q
        cmp "$d/pool/servers/s/disks/d.raw" changed.img

        if [[ $backend == s3 ]]; then
            stop_moto
        fi
        rm -rf "$d/disk.img" "$d/pool" "$d/space" "$d/dummy-space"
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
ENDED=$(date -u '+%H:%M')

# ---- summary -------------------------------------------------------------------
python3 - "$RAW" "$OBJ" "$SIZE_MIB" "$COMMIT" "$STARTED" "$ENDED" "$LOAD_START" "$LOAD_END" \
    "$(ls r*-s3/pool-workaround 2>/dev/null | wc -l)" >results.md <<'EOF'
import csv, statistics, sys
raw, obj, size_mib, commit, started, ended, l0, l1, workaround = sys.argv[1:]
size_mib = int(size_mib); gib = size_mib / 1024
rows = list(csv.DictReader(open(raw), delimiter="\t"))
ops = [("full", "full point"), ("incr", "incremental point (--parent latest)"),
       ("restore", "restore latest"), ("clone", "disk clone (make the clone)"),
       ("hydrate", "disk hydrate (whole clone)")]
def runs(b, op): return [float(r["seconds"]) for r in rows if r["backend"] == b and r["op"] == op]
print(f"cairn {commit}, {started}–{ended} UTC, image {size_mib} MiB, "
      f"load average {l0} at start, {l1} at end; pool.json workaround used in {workaround} S3 rounds\n")
print("| operation | folder s | folder MiB/s | S3 (moto) s | S3 MiB/s | S3 ÷ folder |")
print("|---|---|---|---|---|---|")
for op, name in ops:
    f, s = statistics.median(runs("fs", op)), statistics.median(runs("s3", op))
    rate = lambda t: "%.0f" % (size_mib / t) if t > 0 and op != "clone" else "-"
    print(f"| {name} | {f:.2f} | {rate(f)} | {s:.2f} | {rate(s)} | {s / f if f else 0:.1f}× |")
print("\nS3 requests per operation (median of the rounds; per GiB of image in parentheses):\n")
keys = ["PUT", "GET", "HEAD", "LIST", "POST", "DELETE", "requests"]
print("| operation | " + " | ".join(k if k != "requests" else "total" for k in keys) + " |")
print("|---|" + "---|" * len(keys))
for op, name in ops:
    cells = []
    for k in keys:
        v = statistics.median(int(r[k]) for r in rows if r["backend"] == "s3" and r["op"] == op)
        cells.append(f"{v:g} ({v / gib:.0f})" if v else "0")
    print(f"| {name} | " + " | ".join(cells) + " |")
o = list(csv.DictReader(open(obj), delimiter="\t"))
print("\nObjects after the full point: S3 " + "/".join(r["objects_after_full"] for r in o if r["backend"] == "s3")
      + ", folder (files) " + "/".join(r["objects_after_full"] for r in o if r["backend"] == "fs"))
print("\nAll rounds (s): " + "; ".join(
    f"{op}/{b} " + "/".join("%.2f" % t for t in runs(b, op)) for op, _ in ops for b in ("fs", "s3")))
print("\nAll rounds (S3 requests PUT/GET/HEAD/LIST/POST/DELETE): " + "; ".join(
    f"{op} " + ", ".join("/".join(r[k] for k in keys[:-1]) for r in rows if r["backend"] == "s3" and r["op"] == op)
    for op, _ in ops))
EOF
cat results.md
