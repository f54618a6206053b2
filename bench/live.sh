#!/usr/bin/env bash
# Live disks (issue 3): the speed targets of a disk pool served by `cairn serve-nbd`.
#
#   bash bench/live.sh                       # every part, RUNS=3, medians
#   bash bench/live.sh incr rollback         # some parts: incr rollback latency clone
#   bash bench/live.sh images                # only generate (cache) the two images
#   SIZE_GIB=1 CLONE_GIB=4 CLONE_DATA_GIB=0.25 RUNS=1 bash bench/live.sh   # quick try
#
# Parts (each run of a part starts from a fresh space + pool unless said otherwise):
#   incr      full point of a RUNNING SIZE_GIB disk (the server's first point), then
#             CHANGE_PCT% of the disk rewritten through NBD (fio, nbd engine: random
#             4..64 KiB writes scattered over the whole disk), then the next point
#             (changed-block tracking: only the changed areas are read).
#             Target: incremental <= 5% of the full point's time.
#   rollback  on the pool the last `incr` run left: CHANGE_PCT% rewritten through NBD,
#             server stopped, `cairn point rollback POOL ID --server web --yes`; against
#             `cairn point restore SPACE ID target` of the same point (+ fsync, as
#             rollback syncs too). Target: rollback <= 10% of the restore.
#   latency   4 KiB random writes at queue depth 1 (fio nbd engine, per-I/O latency log):
#             LAT_IDLE_S seconds idle, then a FULL point of the running disk is taken
#             while fio keeps writing, then (control) a first point of the same image
#             file in another process (same work, no live snapshot), then LAT_AFTER_S
#             seconds idle again (the same writer in its steady state: by then its own
#             dirty pages are being written back). clat p50/p99 of the writes completed
#             in each window. Target: p99 during the point <= 2x idle (the first window;
#             the second is shown beside it).
#   clone     a CLONE_GIB disk holding ~CLONE_DATA_GIB of data (ext4 image, mostly
#             empty), one point of it; then (a) first 4 KiB read of a fresh clone, right
#             after `cairn server start` (serve-nbd running, background hydration
#             started), against the same read of the plain disk; (b) `cairn disk
#             hydrate` (offline) against `cairn point restore` of the same point.
#             Targets: first read < 50 ms; hydration >= 80% of restore throughput.
#
# Env: SIZE_GIB (16), FILL (0.45: share of the ext4 image filled with files, as in
#      bench/run.sh), CHANGE_PCT (1), CHUNKS ("4MiB": space chunk sizes for incr and
#      rollback, e.g. "4MiB 256KiB"; latency and clone use the first), CLONE_GIB (64),
#      CLONE_DATA_GIB (3), LAT_IDLE_S (10), LAT_AFTER_S (30), RUNS (3), PORT (10950), CAIRN (binary),
#      BENCH_DIR (bench/work: the work dir is $BENCH_DIR/live).
# Results: $BENCH_DIR/live/results.md (also printed); logs and JSON in $BENCH_DIR/live/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
CAIRN=${CAIRN:-$ROOT/target/release/cairn}
W=${BENCH_DIR:-$HERE/work}/live
SIZE_GIB=${SIZE_GIB:-16}
FILL=${FILL:-0.45}
CHANGE_PCT=${CHANGE_PCT:-1}
CHUNKS=${CHUNKS:-4MiB}
CLONE_GIB=${CLONE_GIB:-64}
CLONE_DATA_GIB=${CLONE_DATA_GIB:-3}
LAT_IDLE_S=${LAT_IDLE_S:-10}
LAT_AFTER_S=${LAT_AFTER_S:-30}
RUNS=${RUNS:-3}
PORT=${PORT:-10950}
PARTS=${*:-incr rollback latency clone}
GEN="python3 $HERE/make-image.py"
URI=nbd://127.0.0.1:$PORT
GiB=$((1024 * 1024 * 1024))
REV=$(cd "$ROOT" && git rev-parse --short HEAD)

# Fixed identity of the generated images (as bench/run.sh).
EPOCH=1700000000
FS_UUID=6b1f3c2e-0d4a-4c8e-9a51-2f6e8d7c4b10
HASH_SEED=0f2b9c7d-5e61-4a38-b0c4-8d1e2f3a4b5c
SEED=42

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for t in fio nbdinfo jq mkfs.ext4 debugfs python3; do
    command -v "$t" >/dev/null || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio libnbd-bin jq e2fsprogs python3
        break
    }
done
if [ ! -x "$CAIRN" ]; then (cd "$ROOT" && cargo build --release -p cairn); fi
mkdir -p "$W/bin" "$W/logs" "$W/images"
cd "$W"
CMDS=$W/commands.txt; : > "$CMDS"
cairn() { "$CAIRN" "$@"; }
# Logged (once per distinct command) for the report, with the binary shown as `cairn`.
note() {
    printf '%s\n' "$*" | sed -E "s|$CAIRN|cairn|g; s|$W/||g; s/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/POINT/g" >> "$CMDS"
}
now_ms() { date +%s%3N; }
median() { sort -g | awk '{a[NR] = $1} END {if (NR) print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
# R[key] holds the values of every run, space-separated; med KEY prints their median.
declare -A R=()
add() { R[$1]+="${R[$1]:+ }$2"; }
med() { tr ' ' '\n' <<< "${R[$1]:-}" | median; }
runs() { tr ' ' '/' <<< "${R[$1]:-}"; }
last() { awk '{print $NF}' <<< "${R[$1]:-}"; }
uniq_runs() { tr ' ' '\n' <<< "${R[$1]:-}" | sort -u | paste -sd/; }   # distinct values
div() { awk -v a="$1" -v b="$2" -v f="${3:-%.3f}" 'BEGIN{ if (b == 0) print "-"; else printf f, a / b }'; }
gib() { awk -v b="$1" 'BEGIN{printf "%.2f", b / 1073741824}'; }
# warm FILE...: reads each file's data into the page cache, skipping its holes (SEEK_DATA):
# a running disk's cache holds its data, not pages of zeros for never-written areas (and
# reading the holes of two 16 GiB files would overflow this machine's RAM by itself).
warm() { python3 "$W/bin/warm.py" "$@"; }
warm_dir() { find "$@" -type f -exec cat {} + > /dev/null; }

logf() { echo "$W/logs/${1//\//-}"; }   # KEY -> a file name under logs/
# timed KEY CMD...: runs CMD (output to logs/KEY.log), adds its wall time in ms to R[KEY].
timed() {
    local key=$1 t0 t1 out; shift
    out=$(logf "$key").log
    note "+ [$key] $*"
    t0=$(now_ms)
    "$@" > "$out" 2>&1 || { tail -n 20 "$out" >&2; die "$key failed: $*"; }
    t1=$(now_ms)
    add "$key" $((t1 - t0))
    printf '   %s: %s ms\n' "$key" $((t1 - t0)) >&2
}

# ------------------------------------------------------------------ helpers ---
# A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies): connect, handshake,
# then one 4 KiB read per OFFSET; prints JSON with the times in ms, measured from just
# before connect() (so the interpreter's start-up is not counted). With IMAGE, checks
# the bytes read against IMAGE at the same offsets.
cat > "$W/bin/nbdread.py" <<'EOF'
import json, socket, struct, sys, time
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
offsets = [int(x) for x in sys.argv[4].split(",")]
image = sys.argv[5] if len(sys.argv) > 5 else None
t0 = time.perf_counter()
s = socket.create_connection((host, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t_conn = time.perf_counter()
def recv(n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("server closed the connection")
        b += c
    return bytes(b)
magic, opt_magic, hflags = struct.unpack(">QQH", recv(18))
assert magic == 0x4E42444D41474943 and opt_magic == 0x49484156454F5054, "not an NBD server"
s.sendall(struct.pack(">I", 1 | (hflags & 2)))  # fixed newstyle (+ no zeroes if offered)
data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
s.sendall(struct.pack(">QII", opt_magic, 7, len(data)) + data)  # NBD_OPT_GO
while True:
    rmagic, opt, rtype, rlen = struct.unpack(">QIII", recv(20))
    payload = recv(rlen)
    if rtype & 0x80000000: raise SystemExit("NBD_OPT_GO refused (%x): %r" % (rtype, payload))
    if rtype == 1: break  # NBD_REP_ACK
t_hs = time.perf_counter()
reads, bad = [], 0
for i, off in enumerate(offsets):
    a = time.perf_counter()
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, off, 4096))
    rmagic, err, handle = struct.unpack(">IIQ", recv(16))
    if err: raise SystemExit("read error %d" % err)
    buf = recv(4096)
    reads.append((time.perf_counter() - a) * 1e3)
    if image:
        with open(image, "rb") as f:
            f.seek(off)
            bad += f.read(4096) != buf
t_end = time.perf_counter()
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 99, 0, 0))  # NBD_CMD_DISC
print(json.dumps({"connect_ms": (t_conn - t0) * 1e3, "handshake_ms": (t_hs - t_conn) * 1e3,
                  "reads_ms": reads, "first_read_total_ms": (t_hs - t0) * 1e3 + reads[0],
                  "mismatches": bad}))
EOF

# Latency percentiles from fio's per-I/O log (ms since epoch, latency in ns) of the
# I/Os completed in each window A:B (ms since epoch, A <= t < B). Prints, per window,
# "N P50 P99" (microseconds; nearest-rank percentiles).
cat > "$W/bin/pct.py" <<'EOF'
import sys
wins = [tuple(int(x) for x in w.split(":")) for w in sys.argv[2:]]
vals = [[] for _ in wins]
for line in open(sys.argv[1]):
    f = line.split(",")
    t, v = int(f[0]), int(f[1])
    for i, (a, b) in enumerate(wins):
        if a <= t < b: vals[i].append(v)
def p(x, q):
    return x[max(0, -(-len(x) * q // 100) - 1)] / 1e3 if x else 0
out = []
for x in vals:
    x.sort()
    out.append("%d %.1f %.1f" % (len(x), p(x, 50), p(x, 99)))
print(" ".join(out))
EOF

# Two 4 KiB blocks of an image holding data (SEEK_DATA/SEEK_HOLE, then not all zeros):
# the first one, and the first at or after 90% of the file data (far from the start).
# Prints "FIRST FAR".
cat > "$W/bin/warm.py" <<'EOF'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    size, pos = os.fstat(fd).st_size, 0
    while pos < size:
        try: d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError: break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        while d < h:
            n = len(os.pread(fd, min(1 << 20, h - d), d))
            if n == 0: break
            d += n
        pos = h
    os.close(fd)
EOF
cat > "$W/bin/dataoff.py" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
ext, pos = [], 0
while pos < size:
    try: d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError: break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    ext.append((d, h)); pos = h
def first_nonzero(after):
    for d, h in ext:
        for blk in range(max(d, after) // 4096, (h + 4095) // 4096):
            if blk * 4096 >= max(d, after) and os.pread(fd, 4096, blk * 4096).strip(b"\0"):
                return blk * 4096
# File data: extents whose middle block is not zeros (mkfs writes the journal as zeros).
files = [(d, h) for d, h in ext if os.pread(fd, 4096, (d + h) // 2 // 4096 * 4096).strip(b"\0")]
total, goal = sum(h - d for d, h in files), 0
acc = 0
for d, h in files:
    if acc + (h - d) >= 0.9 * total:
        goal = d + int(0.9 * total - acc); break
    acc += h - d
print(first_nonzero(0), first_nonzero(goal // 4096 * 4096))
EOF

# ------------------------------------------------------------------- images ---
make_ext4() {   # OUT SIZE_BYTES FILL: deterministic ext4 image (bench/run.sh's recipe)
    local out=$1 bytes=$2 fill=$3 tree=$1.tree
    if [ -f "$out.stamp" ] && [ -f "$out" ]; then log "reusing $out"; return; fi
    rm -rf "$out" "$tree"
    log "generating $(basename "$out"): $(gib "$bytes") GiB ext4, $fill filled"
    $GEN populate "$tree" --image-bytes "$bytes" --fill "$fill" --seed "$SEED" --epoch "$EPOCH" | tee "$out.populate"
    cat > "$W/images/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
EOF
    find "$tree" -exec touch -h -d "@$EPOCH" {} +
    MKE2FS_CONFIG=$W/images/mke2fs.conf SOURCE_DATE_EPOCH=$EPOCH E2FSPROGS_FAKE_TIME=$EPOCH \
        mkfs.ext4 -F -q -t ext4 -d "$tree" -U "$FS_UUID" \
        -E "root_owner=0:0,hash_seed=$HASH_SEED" -L cairnbench "$out" "$((bytes / 1024))k"
    rm -rf "$tree"
    e2fsck -fn "$out" >/dev/null 2>&1 || die "$out fails e2fsck"
    touch "$out.stamp"
}

# -------------------------------------------------------- pool and serving ---
SERVE_PID=""
FIO_PID=""
cleanup() {
    [ -n "$FIO_PID" ] && kill "$FIO_PID" 2>/dev/null || true
    if [ -n "$SERVE_PID" ]; then kill -TERM "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

start_serve() {
    [ -z "$SERVE_PID" ] || return 0
    note "cairn serve-nbd P --listen 127.0.0.1:$PORT &"
    "$CAIRN" serve-nbd P --listen "127.0.0.1:$PORT" >> "$W/logs/serve-nbd.log" 2>&1 &
    SERVE_PID=$!
    for _ in $(seq 200); do
        [ -S P/control.sock ] && nbdinfo --size "$URI/web/root" >/dev/null 2>&1 && return 0
        kill -0 "$SERVE_PID" 2>/dev/null || die "serve-nbd exited (logs/serve-nbd.log)"
        sleep 0.05
    done
    die "serve-nbd did not come up"
}
stop_serve() {   # SIGTERM: disks are closed cleanly (changed-block maps saved)
    [ -n "$SERVE_PID" ] || return 0
    kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || die "serve-nbd exited with $?"
    SERVE_PID=""
}

# setup IMAGE CHUNK: a fresh space S and pool P, disk web/root imported from IMAGE,
# server web started, serve-nbd running, the disk warm in the page cache.
setup() {
    stop_serve
    rm -rf S P
    note "cairn space init S --chunk-size $2; cairn pool init P --space S; cairn server create P web"
    cairn space init S --chunk-size "$2" >/dev/null
    cairn pool init P --space S >/dev/null
    cairn server create P web >/dev/null
    note "cairn disk import P web/root $1 -q; cairn server start P web"
    cairn disk import P web/root "$1" -q >/dev/null
    cairn server start P web >/dev/null
    sync
    # The same page cache state in every run: nothing but what is warmed next (needs root).
    echo 1 2>/dev/null > /proc/sys/vm/drop_caches || true
    warm P/servers/web/disks/root.raw
    start_serve
}

# point KEY: a point of the running server web, timed; JSON kept as logs/KEY-<run>.json.
point() {
    local key=$1 j
    j=$(logf "$key-$RUN").json
    timed "$key" "$CAIRN" point create P --server web --json
    cp "$(logf "$key").log" "$j"
    add "$key.ms" "$(jq .record.duration_ms "$j")"
    add "$key.read" "$(jq .record.stats.bytes_read "$j")"
    add "$key.written" "$(jq .record.stats.bytes_written "$j")"
    add "$key.tracked" "$(jq -r '.tracked[0][1]' "$j")"
    LAST_ID=$(jq -r .record.id "$j")
}

# change SEED: CHANGE_PCT% of the disk web/root rewritten through NBD: random writes of
# 4..64 KiB (half-compressible data) scattered over the whole disk, 16 in flight.
change() {
    local size=$1 seed=$2
    local cmd=(fio --name=change --ioengine=nbd --uri="$URI/web/root" --rw=randwrite
        --bsrange=4k-64k --size="$size" --io_size=$((size * CHANGE_PCT / 100))
        --iodepth=16 --refill_buffers --buffer_compress_percentage=50
        --randseed="$seed" --output-format=json)
    local shown=("${cmd[@]/--randseed=*/--randseed=SEED}")
    note "${shown[*]}   # SEED: 1000+run before an incremental, 2000+run before a rollback"
    "${cmd[@]}" 2>>"$W/logs/fio.err" | sed -n '/^{/,$p' > "$W/logs/change.json"
    CHANGED=$(jq '.jobs[0].write.io_bytes' "$W/logs/change.json")
    CHANGES=$(jq '.jobs[0].write.total_ios' "$W/logs/change.json")
}

# ------------------------------------------------------------------- parts ---
part_incr_rollback() {   # CHUNK
    local c=$1 img=$W/images/ext4-${SIZE_GIB}G.img size=$((SIZE_GIB * GiB)) id
    make_ext4 "$img" "$size" "$FILL"
    IMG_ALLOC[$SIZE_GIB]=$(du -B1 "$img" | cut -f1)
    for RUN in $(seq "$RUNS"); do
        log "incr/$c run $RUN: fresh pool, full point, ${CHANGE_PCT}% changed, next point"
        setup "$img" "$c"
        point "full/$c"
        change "$size" "$((1000 + RUN))"
        add "changed/$c" "$CHANGED"; add "changes/$c" "$CHANGES"
        point "incr/$c"
    done
    [[ " $PARTS " == *" rollback "* ]] || return 0
    # The pool of the last run: roll back to its latest point after each divergence.
    id=$LAST_ID
    for RUN in $(seq "$RUNS"); do
        log "rollback/$c run $RUN: ${CHANGE_PCT}% changed, server stopped, rollback to $id"
        cairn server start P web >/dev/null
        change "$size" "$((2000 + RUN))"
        add "rb-changed/$c" "$CHANGED"
        note "cairn server stop P web"
        cairn server stop P web >/dev/null
        sync
        timed "rollback/$c" "$CAIRN" point rollback P "$id" --server web --yes --json -q
        cp "$(logf "rollback/$c").log" "$W/logs/rollback-$c-$RUN.json"
        add "rollback/$c.compared" "$(jq '.disks[0].bytes_compared' "$W/logs/rollback-$c-$RUN.json")"
        add "rollback/$c.rewritten" "$(jq '.disks[0].bytes_rewritten' "$W/logs/rollback-$c-$RUN.json")"
        add "rollback/$c.method" "$(jq -r '.disks[0].method' "$W/logs/rollback-$c-$RUN.json" | tr ' ' _)"
    done
    stop_serve
    warm_dir S
    for RUN in $(seq "$RUNS"); do
        rm -f restore.img; sync
        timed "restore/$c" "$CAIRN" point restore S "$id" restore.img -q
    done
    log "checking the rolled-back disk against the restore (untimed)"
    cmp P/servers/web/disks/root.raw restore.img || die "rolled-back disk differs from the restored point"
    rm -f restore.img
    rm -rf S P
}

part_latency() {
    local c=${CHUNKS%% *} img=$W/images/ext4-${SIZE_GIB}G.img size=$((SIZE_GIB * GiB))
    local a b c0 c1 e t_start fio_cmd k
    make_ext4 "$img" "$size" "$FILL"
    for RUN in $(seq "$RUNS"); do
        log "latency run $RUN: ${LAT_IDLE_S}s idle, a full point of the disk, then an offline point of its image (control), 4 KiB random writes qd1 throughout"
        setup "$img" "$c"
        rm -rf logs/lat_*.log S2
        cairn space init S2 --chunk-size "$c" >/dev/null
        warm "$img"
        fio_cmd=(fio --name=lat --ioengine=nbd --uri="$URI/web/root" --rw=randwrite --bs=4k
            --iodepth=1 --size="$size" --time_based --runtime=3600
            --write_lat_log="$W/logs/lat" --log_unix_epoch=1 --output-format=json)
        note "${fio_cmd[*]} &   # per-I/O latency log; SIGINT at the end"
        t_start=$(now_ms)
        "${fio_cmd[@]}" > "$W/logs/lat-$RUN.json" 2>>"$W/logs/fio.err" &
        FIO_PID=$!
        sleep "$LAT_IDLE_S"
        a=$(now_ms)
        point "lat-full"
        b=$(now_ms)
        sleep 1
        # Control: the same work (a first point of the same data) in another process, on
        # the image file: the machine's contention without the live disk's snapshot.
        c0=$(now_ms)
        timed lat-control "$CAIRN" point create S2 "$img" --disk root -q
        c1=$(now_ms)
        sleep "$((LAT_AFTER_S + 1))"
        e=$(now_ms)
        kill -INT "$FIO_PID"; wait "$FIO_PID" || true; FIO_PID=""
        # Idle window: from 1 s after fio started to the point's start.
        for k in clat lat; do
            read -r n1 i50 i99 n2 d50 d99 n3 o50 o99 n4 f50 f99 < <(python3 bin/pct.py "logs/lat_$k.1.log" \
                "$((t_start + 1000)):$a" "$a:$((b + 1))" "$c0:$((c1 + 1))" "$((c1 + 1000)):$e")
            add "$k.idle.n" "$n1"; add "$k.idle.p50" "$i50"; add "$k.idle.p99" "$i99"
            add "$k.dur.n" "$n2"; add "$k.dur.p50" "$d50"; add "$k.dur.p99" "$d99"
            add "$k.ctl.n" "$n3"; add "$k.ctl.p50" "$o50"; add "$k.ctl.p99" "$o99"
            add "$k.after.n" "$n4"; add "$k.after.p50" "$f50"; add "$k.after.p99" "$f99"
        done
        printf '   clat p50/p99 us: idle %s/%s, during the point %s/%s, during the control %s/%s, idle after %s/%s\n' \
            "$(last clat.idle.p50)" "$(last clat.idle.p99)" "$(last clat.dur.p50)" "$(last clat.dur.p99)" \
            "$(last clat.ctl.p50)" "$(last clat.ctl.p99)" "$(last clat.after.p50)" "$(last clat.after.p99)" >&2
    done
    stop_serve
    rm -rf S P S2 logs/lat_*.log
}

part_clone() {
    local c=${CHUNKS%% *} img=$W/images/ext4-${CLONE_GIB}G.img size=$((CLONE_GIB * GiB)) id off0 offl j
    make_ext4 "$img" "$size" "$(awk -v d="$CLONE_DATA_GIB" -v s="$CLONE_GIB" 'BEGIN{printf "%.4f", d / s}')"
    CLONE_ALLOC=$(du -B1 "$img" | cut -f1)
    read -r off0 offl < <(python3 bin/dataoff.py "$img")
    OFF_FIRST=$off0; OFF_LAST=$offl
    log "clone: ${CLONE_GIB} GiB disk, $(gib "$CLONE_ALLOC") GiB allocated; reads at $off0 and $offl"
    setup "$img" "$c"
    RUN=1
    point "clone-point"
    id=$LAST_ID
    CLONE_POINT_READ=$(jq .record.stats.bytes_read "logs/clone-point-1.json")
    CLONE_POINT_STORED=$(jq .record.stats.bytes_written "logs/clone-point-1.json")
    note "cairn server create P copy"
    cairn server create P copy >/dev/null
    # (a) First reads: the far block first (its chunk is fetched on demand: background
    # hydration goes from the start), then block 0.
    for RUN in $(seq "$RUNS"); do
        log "clone run $RUN: clone, server start, first 4 KiB reads"
        note "cairn disk clone P $id copy/root --from-disk root"
        cairn disk clone P "$id" copy/root --from-disk root >/dev/null
        local t0 t1
        note "cairn server start P copy; python3 bin/nbdread.py 127.0.0.1 $PORT copy/root $offl,$off0 IMAGE"
        t0=$(now_ms)
        cairn server start P copy >/dev/null
        t1=$(now_ms)
        python3 bin/nbdread.py 127.0.0.1 "$PORT" copy/root "$offl,$off0" "$img" > "logs/clone-read-$RUN.json"
        j=logs/clone-read-$RUN.json
        [ "$(jq .mismatches "$j")" = 0 ] || die "the clone returned wrong data ($j)"
        add clone.start "$((t1 - t0))"
        add clone.read "$(jq '(.reads_ms[0]) * 100 | round / 100' "$j")"
        add clone.read0 "$(jq '(.reads_ms[1]) * 100 | round / 100' "$j")"
        add clone.total "$(jq '(.first_read_total_ms) * 100 | round / 100' "$j")"
        add clone.hs "$(jq '(.connect_ms + .handshake_ms) * 100 | round / 100' "$j")"
        python3 bin/nbdread.py 127.0.0.1 "$PORT" web/root "$offl,$off0" "$img" > "logs/plain-read-$RUN.json"
        j=logs/plain-read-$RUN.json
        add plain.read "$(jq '(.reads_ms[0]) * 100 | round / 100' "$j")"
        add plain.read0 "$(jq '(.reads_ms[1]) * 100 | round / 100' "$j")"
        add plain.total "$(jq '(.first_read_total_ms) * 100 | round / 100' "$j")"
        add plain.hs "$(jq '(.connect_ms + .handshake_ms) * 100 | round / 100' "$j")"
        note "cairn server stop P copy; cairn disk delete P copy/root --yes"
        cairn server stop P copy >/dev/null
        cairn disk delete P copy/root --yes >/dev/null
    done
    # (b) Hydration (offline) against restore of the same point.
    stop_serve
    for RUN in $(seq "$RUNS"); do
        log "hydrate run $RUN"
        note "cairn disk clone P $id copy/root --from-disk root"
        cairn disk clone P "$id" copy/root --from-disk root >/dev/null
        sync; warm_dir S
        timed hydrate "$CAIRN" disk hydrate P copy/root -q
        if [ "$RUN" -lt "$RUNS" ]; then cairn disk delete P copy/root --yes >/dev/null; fi
    done
    for RUN in $(seq "$RUNS"); do
        log "restore run $RUN"
        rm -f restore.img; sync; warm_dir S
        timed restore "$CAIRN" point restore S "$id" restore.img -q
    done
    log "checking the hydrated clone and the restore against the image (untimed)"
    cmp "$img" restore.img || die "restore differs from the image"
    cmp "$img" P/servers/copy/disks/root.raw || die "hydrated clone differs from the image"
    HYD_ALLOC=$(du -B1 P/servers/copy/disks/root.raw | cut -f1)
    RST_ALLOC=$(du -B1 restore.img | cut -f1)
    rm -rf restore.img S P
}

declare -A IMG_ALLOC=()
for part in $PARTS; do
    case $part in
        incr|rollback) [[ " $PARTS " == *" incr "* ]] || die "rollback runs on the pool the incr part leaves: give incr too" ;;
        latency|clone|images) ;;
        *) die "unknown part $part (incr rollback latency clone images)" ;;
    esac
done
note "# cwd: $W; every part: cairn space init / pool init / server create / disk import / server start / serve-nbd (fresh)"
if [ "$PARTS" = images ]; then   # only generate (cache) the images
    make_ext4 "$W/images/ext4-${SIZE_GIB}G.img" $((SIZE_GIB * GiB)) "$FILL"
    make_ext4 "$W/images/ext4-${CLONE_GIB}G.img" $((CLONE_GIB * GiB)) "$(awk -v d="$CLONE_DATA_GIB" -v s="$CLONE_GIB" 'BEGIN{printf "%.4f", d / s}')"
    exit 0
fi
[[ " $PARTS " == *" incr "* ]] && for c in $CHUNKS; do part_incr_rollback "$c"; done
[[ " $PARTS " == *" latency "* ]] && part_latency
[[ " $PARTS " == *" clone "* ]] && part_clone

# ------------------------------------------------------------------ report ---
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN{ ok = (op == "<=") ? (v <= t) : (v >= t); print ok ? "met" : "**missed**" }'; }
report() {
    local c ratio
    echo "# Live disks (issue 3): bench/live.sh"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r), cairn $("$CAIRN" --version | awk '{print $2}') ($REV), $(fio --version)."
    echo "RUNS=$RUNS (medians; all runs after the slash-separated lists), SIZE_GIB=$SIZE_GIB FILL=$FILL CHANGE_PCT=$CHANGE_PCT CHUNKS=\"$CHUNKS\" CLONE_GIB=$CLONE_GIB CLONE_DATA_GIB=$CLONE_DATA_GIB."
    echo
    echo "| target | measured | ratio | |"
    echo "|---|---|---|---|"
    if [[ " $PARTS " == *" incr "* ]]; then
        for c in $CHUNKS; do
            ratio=$(div "$(med "incr/$c.ms")" "$(med "full/$c.ms")" %.4f)
            echo "| incremental <= 5% of full ($c chunks) | incr $(med "incr/$c.ms") ms vs full $(med "full/$c.ms") ms (record.duration_ms) | $(awk -v r="$ratio" 'BEGIN{printf "%.1f%%", 100 * r}') | $(verdict "$ratio" 0.05 "<=") |"
        done
    fi
    if [[ " $PARTS " == *" rollback "* ]]; then
        for c in $CHUNKS; do
            ratio=$(div "$(med "rollback/$c")" "$(med "restore/$c")" %.4f)
            echo "| rollback <= 10% of restore ($c chunks) | rollback $(med "rollback/$c") ms vs restore $(med "restore/$c") ms | $(awk -v r="$ratio" 'BEGIN{printf "%.1f%%", 100 * r}') | $(verdict "$ratio" 0.10 "<=") |"
        done
    fi
    if [[ " $PARTS " == *" latency "* ]]; then
        ratio=$(div "$(med clat.dur.p99)" "$(med clat.idle.p99)" %.2f)
        echo "| write p99 during a full point <= 2x idle | clat p99 $(med clat.dur.p99) us vs idle $(med clat.idle.p99) us (p50 $(med clat.dur.p50) vs $(med clat.idle.p50) us) | ${ratio}x (vs idle after: $(div "$(med clat.dur.p99)" "$(med clat.after.p99)" %.2f)x, $(med clat.after.p99) us) | $(verdict "$ratio" 2 "<=") |"
    fi
    if [[ " $PARTS " == *" clone "* ]]; then
        echo "| first 4 KiB read of a ${CLONE_GIB} GiB clone < 50 ms | $(med clone.read) ms request to reply; connect + handshake + read (checked against the target): $(med clone.total) ms; plain disk: $(med plain.read) / $(med plain.total) ms | | $(verdict "$(med clone.total)" 50 "<=") |"
        ratio=$(div "$(med restore)" "$(med hydrate)" %.3f)
        echo "| hydration >= 80% of restore throughput | hydrate $(med hydrate) ms vs restore $(med restore) ms | $(awk -v r="$ratio" 'BEGIN{printf "%.0f%%", 100 * r}') | $(verdict "$ratio" 0.8 ">=") |"
    fi
    echo
    if [[ " $PARTS " == *" incr "* ]]; then
        echo "## Points of a running ${SIZE_GIB} GiB disk ($(gib "${IMG_ALLOC[$SIZE_GIB]}") GiB allocated)"
        echo
        echo "| chunk size | full ms (wall) | full read GiB | full stored MiB | changed (fio) | incr ms (wall) | incr read GiB | incr stored MiB | tracked | all runs (duration_ms) |"
        echo "|---|---|---|---|---|---|---|---|---|---|"
        for c in $CHUNKS; do
            echo "| $c | $(med "full/$c.ms") ($(med "full/$c")) | $(gib "$(med "full/$c.read")") | $(div "$(med "full/$c.written")" 1048576 %.1f) | $(div "$(med "changed/$c")" 1048576 %.1f) MiB in $(med "changes/$c") writes | $(med "incr/$c.ms") ($(med "incr/$c")) | $(gib "$(med "incr/$c.read")") | $(div "$(med "incr/$c.written")" 1048576 %.1f) | $(runs "incr/$c.tracked") | full $(runs "full/$c.ms"); incr $(runs "incr/$c.ms") |"
        done
        echo
    fi
    if [[ " $PARTS " == *" rollback "* ]]; then
        echo "## Rollback vs restore of the same point"
        echo
        echo "| chunk size | rollback ms | compared GiB | rewritten GiB | method | restore ms | all runs |"
        echo "|---|---|---|---|---|---|---|"
        for c in $CHUNKS; do
            echo "| $c | $(med "rollback/$c") | $(gib "$(med "rollback/$c.compared")") | $(gib "$(med "rollback/$c.rewritten")") | $(uniq_runs "rollback/$c.method" | tr _ ' ') | $(med "restore/$c") | rollback $(runs "rollback/$c"); restore $(runs "restore/$c") |"
        done
        echo
    fi
    if [[ " $PARTS " == *" latency "* ]]; then
        echo "## 4 KiB random write latency (qd1, one fio nbd job), idle vs during a full point"
        echo
        echo "| window | writes | clat p50 us | clat p99 us | lat p50 us | lat p99 us | all runs (clat p99) |"
        echo "|---|---|---|---|---|---|---|"
        echo "| idle ($((LAT_IDLE_S - 1)) s) | $(med clat.idle.n) | $(med clat.idle.p50) | $(med clat.idle.p99) | $(med lat.idle.p50) | $(med lat.idle.p99) | $(runs clat.idle.p99) |"
        echo "| during the full point of the running disk ($(med lat-full.ms) ms; runs $(runs lat-full.ms)) | $(med clat.dur.n) | $(med clat.dur.p50) | $(med clat.dur.p99) | $(med lat.dur.p50) | $(med lat.dur.p99) | $(runs clat.dur.p99) |"
        echo "| control: during an offline first point of the image file, another process ($(med lat-control) ms) | $(med clat.ctl.n) | $(med clat.ctl.p50) | $(med clat.ctl.p99) | $(med lat.ctl.p50) | $(med lat.ctl.p99) | $(runs clat.ctl.p99) |"
        echo "| idle after (${LAT_AFTER_S} s, the same writer in its steady state) | $(med clat.after.n) | $(med clat.after.p50) | $(med clat.after.p99) | $(med lat.after.p50) | $(med lat.after.p99) | $(runs clat.after.p99) |"
        echo
    fi
    if [[ " $PARTS " == *" clone "* ]]; then
        echo "## Clone of a ${CLONE_GIB} GiB disk ($(gib "$CLONE_ALLOC") GiB allocated; the point read $(gib "$CLONE_POINT_READ") GiB, stored $(gib "$CLONE_POINT_STORED") GiB)"
        echo
        echo "| | clone | plain disk | all runs (clone) |"
        echo "|---|---|---|---|"
        echo "| \`cairn server start P copy\` (wall ms) | $(med clone.start) | | $(runs clone.start) |"
        echo "| connect + handshake (ms) | $(med clone.hs) | $(med plain.hs) | $(runs clone.hs) |"
        echo "| first 4 KiB read at $OFF_LAST (request to reply, ms) | $(med clone.read) | $(med plain.read) | $(runs clone.read) |"
        echo "| connect + handshake + that read (ms) | $(med clone.total) | $(med plain.total) | $(runs clone.total) |"
        echo "| next read, at $OFF_FIRST (ms) | $(med clone.read0) | $(med plain.read0) | $(runs clone.read0) |"
        echo
        local l=$((CLONE_GIB * GiB))
        echo "| | ms | GiB/s of logical size | GiB/s of data read | output allocated GiB | all runs |"
        echo "|---|---|---|---|---|---|"
        echo "| \`cairn disk hydrate\` (offline) | $(med hydrate) | $(div "$(gib "$l")" "$(div "$(med hydrate)" 1000)" %.2f) | $(div "$(gib "$CLONE_POINT_READ")" "$(div "$(med hydrate)" 1000)" %.2f) | $(gib "$HYD_ALLOC") | $(runs hydrate) |"
        echo "| \`cairn point restore\` | $(med restore) | $(div "$(gib "$l")" "$(div "$(med restore)" 1000)" %.2f) | $(div "$(gib "$CLONE_POINT_READ")" "$(div "$(med restore)" 1000)" %.2f) | $(gib "$RST_ALLOC") | $(runs restore) |"
        echo
    fi
    echo "## Commands (cwd: $W)"
    echo
    echo '```'
    awk '!seen[$0]++' "$CMDS"
    echo '```'
}
report > "$W/results.md"
cat "$W/results.md"

