#!/usr/bin/env bash
# The location daemon (issue 4 §7): scheduler lateness and API latency of `cairn serve`.
#
#   bash bench/daemon.sh schedule            # KIND=interval, N=1000, MAX_JOBS=4, MINUTES=5
#   KIND=cron MAX_JOBS=64 bash bench/daemon.sh schedule
#   bash bench/daemon.sh api                 # 1,000 points, GET /points at 500 requests/s
#   N=50 MINUTES=2 bash bench/daemon.sh schedule   # quick try
#
# Parts (each starts a daemon on a fresh data directory and stops it with SIGTERM):
#   schedule  N servers, each with one small disk (1..16 MiB, DATA_KIB of random data
#             written into the stopped disk's file before its first point; RUNNING of
#             them are started and written through NBD with qemu-io every 10 s), and N
#             policies, one per server, on a one-minute schedule: KIND=interval
#             (`{"interval":"1m"}`: anchored at each policy's creation, the creations
#             paced over SPREAD_S seconds, so due times are spread over the minute) or
#             KIND=cron (`* * * * *`: all N due at the same second). After the set-up
#             the daemon runs MINUTES minutes; then every job the scheduler made with a
#             due time in that window is read from the control database (D/cairn.db,
#             table jobs) and its lateness computed: started_at - due_at (it had a job
#             slot and began) and queued_at - due_at (the scheduler created it).
#             Target: every job starts within 1 s of its due time.
#   api       one server with a DATA_KIB disk, one policy (cron once a year: no scheduled
#             run) and POINTS replicate-now jobs in sequence (each waited for) = POINTS
#             recovery points; then `oha` at a fixed RATE requests/s for DURATION
#             (latency corrected for coordinated omission) on GET
#             /api/v1/points?policy=P (default page, 100 items) and ...&limit=1000.
#             Target: p99 < 20 ms at 500 requests/s with 1,000 points.
#
# Env: N (1000), KIND (interval|cron), MAX_JOBS (4; "default" = the daemon's default),
#      MINUTES (5), SPREAD_S (60, interval only), RUNNING (5), DATA_KIB (256),
#      POINTS (1000), RATE (500), DURATION (30s), CONNS (50), PORT (7460),
#      NBD_PORT (10960), CAIRN (binary; copied to the work dir before a run), BENCH_DIR
#      (bench/work: the work dir is $BENCH_DIR/daemon), LOCK (/tmp/cairn-bench.lock:
#      the whole run holds it; "none" to skip).
# Results: $BENCH_DIR/daemon/results.md (appended; also printed); logs in $W/logs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
LOCK=${LOCK:-/tmp/cairn-bench.lock}
if [ "$LOCK" != none ] && [ -z "${CAIRN_BENCH_LOCKED:-}" ]; then
    echo "waiting for $LOCK ..." >&2
    exec env CAIRN_BENCH_LOCKED=1 flock "$LOCK" bash "${BASH_SOURCE[0]}" "$@"
fi
W=${BENCH_DIR:-$HERE/work}/daemon
N=${N:-1000}
KIND=${KIND:-interval}
MAX_JOBS=${MAX_JOBS:-4}
MINUTES=${MINUTES:-5}
SPREAD_S=${SPREAD_S:-60}
RUNNING=${RUNNING:-5}
DATA_KIB=${DATA_KIB:-256}
POINTS=${POINTS:-1000}
RATE=${RATE:-500}
DURATION=${DURATION:-30s}
CONNS=${CONNS:-50}
PORT=${PORT:-7460}
NBD_PORT=${NBD_PORT:-10960}
PARTS=${*:-schedule api}
REV=$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- crates || echo "+dirty")

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for t in python3 qemu-io curl; do
    command -v "$t" >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 qemu-utils curl
        break
    }
done
export PATH=$HOME/.cargo/bin:$PATH
mkdir -p "$W/bin" "$W/logs"
if [ -z "${CAIRN:-}" ]; then
    [ -x "$ROOT/target/release/cairn" ] || (cd "$ROOT" && cargo build --release -p cairn)
    CAIRN=$ROOT/target/release/cairn
fi
# Others rebuild target/ meanwhile: run a copy.
cp -p "$CAIRN" "$W/bin/cairn"
CAIRN=$W/bin/cairn
RESULTS=$W/results.md
API=http://127.0.0.1:$PORT

# ------------------------------------------------------------------ helper ---
cat > "$W/bin/daemon.py" <<'EOF'
"""Set-up and measurement for bench/daemon.sh (HTTP API through http.client)."""
import http.client, json, os, random, sqlite3, subprocess, sys, time
from datetime import datetime, timezone

API_PORT = int(os.environ["PORT"])
TOKEN = os.environ["TOKEN"]
conn = None

def req(method, path, body=None, ok=(200, 201, 202)):
    global conn
    for attempt in range(3):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=60)
            h = {"Authorization": "Bearer " + TOKEN}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                h["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            out = r.read()
            break
        except (ConnectionError, http.client.HTTPException):
            conn = None
            if attempt == 2:
                raise
    if r.status not in ok:
        raise SystemExit(f"{method} {path}: {r.status} {out[:300]!r}")
    return json.loads(out) if out else None

def parse(t):
    return datetime.fromisoformat(t.replace("Z", "+00:00")) if t else None

def now_iso():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

def setup(n, kind, spread_s, running, data_kib, data_dir, nbd_port):
    rnd = random.Random(4)
    t0 = time.time()
    for i in range(n):
        s = f"s{i:04d}"
        size = (1 + (i * 7) % 16) << 20
        req("POST", "/api/v1/servers", {"name": s})
        req("POST", "/api/v1/disks", {"disk": f"{s}/root", "size": size})
        if data_kib:
            # The server is stopped: its disk is a file of the pool.
            with open(f"{data_dir}/pool/servers/{s}/disks/root.raw", "r+b") as f:
                f.write(rnd.randbytes(min(data_kib << 10, size)))
    t1 = time.time()
    for i in range(running):
        req("POST", f"/api/v1/servers/s{i:04d}/start")
    t2 = time.time()
    sched = {"interval": "1m"} if kind == "interval" else {"cron": "* * * * *", "timezone": "UTC"}
    pace = spread_s / n if kind == "interval" else 0
    start = time.time()
    for i in range(n):
        if pace:
            d = start + i * pace - time.time()
            if d > 0:
                time.sleep(d)
        req("POST", "/api/v1/policies",
            {"name": f"p{i:04d}", "schedule": sched, "scope": [f"s{i:04d}"]})
    t3 = time.time()
    print(json.dumps({"servers_disks_s": round(t1 - t0, 1), "start_s": round(t2 - t1, 1),
                      "policies_s": round(t3 - t2, 1), "t0": now_iso()}))

def writer(running, nbd_port, until_epoch):
    """Writes 64 KiB at a random offset of each running server's disk every 10 s."""
    rnd = random.Random(7)
    k = 0
    while time.time() < until_epoch:
        for i in range(running):
            off = rnd.randrange(0, 16) * 65536
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {k % 250 + 1} {off} 64k",
                            f"nbd://127.0.0.1:{nbd_port}/s{i:04d}/root"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        k += 1
        time.sleep(max(0.0, min(10.0, until_epoch - time.time())))

def pct(xs, p):
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))
    return xs[int(k)]

def measure(db, t0, t1, wait_s):
    """Scheduled jobs due in [t0, t1): lateness in ms. Waits (up to wait_s) until every
    one of them has started."""
    c = sqlite3.connect(db, timeout=30)
    deadline = time.time() + wait_s
    while True:
        q = c.execute("SELECT COUNT(*) FROM jobs WHERE trigger = 'schedule' AND state = 'queued' "
                      "AND due_at >= ? AND due_at < ?", (t0, t1)).fetchone()[0]
        if q == 0 or time.time() > deadline:
            break
        time.sleep(1)
    rows = c.execute("SELECT due_at, queued_at, started_at, ended_at, state, duration_ms, error "
                     "FROM jobs WHERE trigger = 'schedule' AND kind = 'replication' "
                     "AND due_at >= ? AND due_at < ? ORDER BY due_at", (t0, t1)).fetchall()
    start_late, queue_late, durations = [], [], []
    states, errors, still_queued = {}, {}, 0
    for due, queued, started, ended, state, dur, err in rows:
        states[state] = states.get(state, 0) + 1
        d = parse(due)
        queue_late.append((parse(queued) - d).total_seconds() * 1000)
        if state == "skipped":
            continue
        if started is None:
            still_queued += 1
            start_late.append(float("inf"))
            continue
        start_late.append((parse(started) - d).total_seconds() * 1000)
        if dur is not None and state == "succeeded":
            durations.append(dur)
        if state == "failed":
            errors[err] = errors.get(err, 0) + 1
    def dist(xs):
        return {"n": len(xs), "min": pct(xs, 0.0001), "p50": pct(xs, 50), "p90": pct(xs, 90),
                "p99": pct(xs, 99), "max": max(xs) if xs else None,
                "within_1s": sum(1 for x in xs if x <= 1000),
                "within_1s_pct": round(100 * sum(1 for x in xs if x <= 1000) / len(xs), 2) if xs else None}
    dues = sorted({r[0] for r in rows})
    out = {"jobs": len(rows), "states": states, "still_queued": still_queued,
           "distinct_due_times": len(dues),
           "started_minus_due_ms": dist(start_late), "queued_minus_due_ms": dist(queue_late),
           "duration_ms": dist(durations), "errors": errors}
    # Per due minute: the worst start lateness (does it drift?).
    per_min = {}
    for due, queued, started, *_ in rows:
        if started:
            m = due[:16]
            per_min[m] = max(per_min.get(m, 0), (parse(started) - parse(due)).total_seconds() * 1000)
    out["max_start_late_per_minute_ms"] = per_min
    print(json.dumps(out))

def make_points(points):
    req("POST", "/api/v1/servers", {"name": "web"})
    req("POST", "/api/v1/disks", {"disk": "web/root", "size": 1 << 20})
    req("POST", "/api/v1/policies", {"name": "big", "schedule": {"cron": "0 0 1 1 *", "timezone": "UTC"},
                                     "scope": ["web"]})
    t0 = time.time()
    for i in range(points):
        out = req("POST", "/api/v1/policies/big/replicate-now")
        job = out["job"]["id"]
        while True:
            j = req("GET", f"/api/v1/jobs/{job}")
            if j["state"] not in ("queued", "running"):
                break
            time.sleep(0.002)
        if j["state"] != "succeeded":
            raise SystemExit(f"job {job}: {j['state']} {j.get('error')}")
    page = req("GET", "/api/v1/points?policy=big&limit=1000")
    print(json.dumps({"points": len(page["items"]), "seconds": round(time.time() - t0, 1)}))

if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "setup":
        setup(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5]),
              int(sys.argv[6]), sys.argv[7], int(sys.argv[8]))
    elif cmd == "writer":
        writer(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif cmd == "measure":
        measure(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
    elif cmd == "points":
        make_points(int(sys.argv[2]))
EOF
PY="python3 $W/bin/daemon.py"

# ------------------------------------------------------------------ daemon ---
DPID=
start_daemon() {  # DATA_DIR [MAX_JOBS]
    local d=$1 mj=${2:-default} extra=()
    rm -rf "$d"; mkdir -p "$d"
    TOKEN=$("$CAIRN" token create bench --role admin --data-dir "$d")
    export TOKEN PORT
    [ "$mj" = default ] || extra=(--max-jobs "$mj")
    "$CAIRN" serve --data-dir "$d" --listen "127.0.0.1:$PORT" --nbd-listen "127.0.0.1:$NBD_PORT" \
        "${extra[@]}" > "$W/logs/daemon-$(basename "$d").log" 2>&1 &
    DPID=$!
    for _ in $(seq 100); do
        curl -sf "$API/healthz" > /dev/null && return 0
        sleep 0.1
    done
    die "the daemon did not answer on $API"
}
stop_daemon() {
    [ -n "$DPID" ] || return 0
    kill -TERM "$DPID" 2>/dev/null || true
    wait "$DPID" 2>/dev/null || true
    DPID=
}
trap stop_daemon EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }                 # utime + stime
busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; } # all CPUs, non-idle
TCK=$(getconf CLK_TCK)

note_machine() {
    printf -- '- %s; load average %s; commit %s; binary %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$REV" "$(stat -c %y "$CAIRN" | cut -d. -f1)"
}

# ------------------------------------------------------------------ schedule ---
part_schedule() {
    local d=$W/sched-$KIND-$MAX_JOBS
    log "schedule: N=$N KIND=$KIND MAX_JOBS=$MAX_JOBS MINUTES=$MINUTES RUNNING=$RUNNING"
    start_daemon "$d" "$MAX_JOBS"
    local setup t0 t1 c0 c1 b0 b1 w0 w1 end
    setup=$($PY setup "$N" "$KIND" "$SPREAD_S" "$RUNNING" "$DATA_KIB" "$d" "$NBD_PORT")
    echo "set-up: $setup" >&2
    t0=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["t0"])' "$setup")
    c0=$(cpu_ticks "$DPID"); b0=$(busy_ticks); w0=$(date +%s.%N)
    end=$(( $(date +%s) + MINUTES * 60 ))
    local wpid=
    if [ "$RUNNING" -gt 0 ]; then $PY writer "$RUNNING" "$NBD_PORT" "$end" & wpid=$!; fi
    sleep $((MINUTES * 60))
    [ -z "$wpid" ] || wait "$wpid"
    t1=$(python3 -c 'from datetime import datetime,timezone; print(datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00","Z"))')
    c1=$(cpu_ticks "$DPID"); b1=$(busy_ticks); w1=$(date +%s.%N)
    local hwm; hwm=$(awk '/VmHWM/{print $2}' "/proc/$DPID/status")
    local m; m=$($PY measure "$d/cairn.db" "$t0" "$t1" 120)
    stop_daemon
    echo "$m" > "$W/logs/sched-$KIND-$MAX_JOBS.json"
    python3 - "$m" "$setup" "$c0" "$c1" "$b0" "$b1" "$w0" "$w1" "$TCK" "$hwm" >> "$RESULTS" <<'EOF'
import json, sys
m, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
c0, c1, b0, b1 = map(int, sys.argv[3:7]); w0, w1 = map(float, sys.argv[7:9]); tck = int(sys.argv[9])
wall = w1 - w0
def row(name, d):
    f = lambda x: "-" if x is None else ("never" if x == float("inf") else f"{x:.0f}")
    return f"| {name} | {d['n']} | {f(d['min'])} | {f(d['p50'])} | {f(d['p90'])} | {f(d['p99'])} | {f(d['max'])} | {d['within_1s_pct']}% |"
print(f"  - set-up: servers+disks {s['servers_disks_s']} s, policies {s['policies_s']} s; window from {s['t0']}, {wall:.0f} s")
print(f"  - jobs due in the window: {m['jobs']} ({m['distinct_due_times']} distinct due times); states {m['states']}; never started {m['still_queued']}; errors {m['errors'] or 'none'}")
print(f"  - daemon CPU {(c1 - c0) / tck:.1f} s = {100 * (c1 - c0) / tck / wall:.0f}% of one core; machine busy {100 * (b1 - b0) / tck / wall / 2:.0f}% of 2 cores; daemon peak RSS {int(sys.argv[10]) // 1024} MiB")
print("")
print("  | ms (nearest rank) | n | min | p50 | p90 | p99 | max | ≤ 1 s |")
print("  |---|---|---|---|---|---|---|---|")
print("  " + row("started_at - due_at", m["started_minus_due_ms"]))
print("  " + row("queued_at - due_at", m["queued_minus_due_ms"]))
print("  " + row("job duration (succeeded)", m["duration_ms"]))
print("")
print("  - worst start lateness per due minute (ms): " + ", ".join(f"{k[11:]} {v:.0f}" for k, v in sorted(m["max_start_late_per_minute_ms"].items())))
EOF
}

# ------------------------------------------------------------------ api ---
oha_run() {  # NAME URL
    local name=$1 url=$2 c0 c1 w0 w1 out=$W/logs/oha-$1.json
    c0=$(cpu_ticks "$DPID"); w0=$(date +%s.%N)
    oha -z "$DURATION" -q "$RATE" -c "$CONNS" --latency-correction --no-tui --output-format json \
        -H "Authorization: Bearer $TOKEN" "$url" > "$out"
    c1=$(cpu_ticks "$DPID"); w1=$(date +%s.%N)
    python3 - "$out" "$name" "$c0" "$c1" "$w0" "$w1" "$TCK" "$(curl -s -H "Authorization: Bearer $TOKEN" "$url" | wc -c)" >> "$RESULTS" <<'EOF'
import json, sys
o = json.load(open(sys.argv[1])); name = sys.argv[2]
c0, c1 = int(sys.argv[3]), int(sys.argv[4]); w0, w1 = float(sys.argv[5]), float(sys.argv[6]); tck = int(sys.argv[7])
s, p = o["summary"], o["latencyPercentiles"]
ms = lambda x: "-" if x is None else f"{1000 * x:.2f}"
codes = o.get("statusCodeDistribution", {}); errs = o.get("errorDistribution", {})
n = sum(codes.values())
print(f"  | {name} | {int(sys.argv[8]) // 1024} KiB | {s['requestsPerSec']:.0f} | {n} | {ms(p['p50'])} | {ms(p['p90'])} | {ms(p['p99'])} | {ms(s['slowest'])} | {codes} {errs or ''} | {100 * (c1 - c0) / tck / (w1 - w0):.0f}% |")
EOF
}

part_api() {
    local d=$W/api
    log "api: POINTS=$POINTS RATE=$RATE DURATION=$DURATION CONNS=$CONNS"
    # oha: constant request rate (-q), latencies corrected for coordinated omission.
    command -v oha >/dev/null || cargo install --locked oha
    start_daemon "$d" default
    local p; p=$($PY points "$POINTS")
    echo "points: $p" >&2
    {
        echo "  - $p (replicate-now in sequence, each waited for)"
        echo "  - oha $(oha --version | awk '{print $2}'): \`oha -z $DURATION -q $RATE -c $CONNS --latency-correction --no-tui --output-format json -H 'Authorization: Bearer T' URL\`"
        echo ""
        echo "  | GET | body | req/s | requests | p50 ms | p90 ms | p99 ms | max ms | status / errors | daemon CPU |"
        echo "  |---|---|---|---|---|---|---|---|---|---|"
    } >> "$RESULTS"
    oha_run "points?policy=big" "$API/api/v1/points?policy=big"
    oha_run "points?policy=big&limit=1000" "$API/api/v1/points?policy=big&limit=1000"
    stop_daemon
}

for part in $PARTS; do
    {
        echo ""
        case $part in
            schedule) echo "- **schedule** N=$N KIND=$KIND MAX_JOBS=$MAX_JOBS MINUTES=$MINUTES RUNNING=$RUNNING DATA_KIB=$DATA_KIB SPREAD_S=$SPREAD_S" ;;
            api) echo "- **api** POINTS=$POINTS RATE=$RATE DURATION=$DURATION CONNS=$CONNS" ;;
            *) die "unknown part $part (schedule, api)" ;;
        esac
        note_machine
    } >> "$RESULTS"
    mark=$(wc -l < "$RESULTS")
    "part_$part"
    sed -n "$((mark - 2)),\$p" "$RESULTS"
done
