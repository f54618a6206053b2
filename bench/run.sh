#!/usr/bin/env bash
# Cairn benchmark: cairn vs restic / borg / casync / zstd on a deterministic
# ext4 disk image, everything warm in the page cache.
#
#   bench/run.sh            # compare mode, SIZE_GIB (default 4) image
#   SIZE_GIB=2 bench/run.sh
#   bench/run.sh memory     # peak RSS of cairn on a 16 GiB sparse image
#
# Env: SIZE_GIB (default 4), BENCH_DIR (default bench/work), CAIRN (binary),
#      MEM_SIZE_GIB (default 16), MEM_DATA_MIB (default 1024).
# Results: bench/results-<size>G.md / bench/results-memory.md; logs under the
# work dir (run-<size>G/*.log, commands.txt).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
MODE=${1:-compare}
SIZE_GIB=${SIZE_GIB:-4}
W=${BENCH_DIR:-$HERE/work}
CAIRN=${CAIRN:-$ROOT/target/release/cairn}
GEN="python3 $HERE/make-image.py"

# Fixed identity of the generated image (reproducibility).
EPOCH=1700000000
FS_UUID=6b1f3c2e-0d4a-4c8e-9a51-2f6e8d7c4b10
HASH_SEED=0f2b9c7d-5e61-4a38-b0c4-8d1e2f3a4b5c
SEED=42

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- setup ---
ensure_tools() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*}; pkg=${pair#*:}
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing missing tools: ${missing[*]}"
        local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get install -y "${missing[@]}" || {
            $sudo apt-get update && $sudo apt-get install -y "${missing[@]}"; }
    fi
}

ensure_cairn() {
    if [ ! -x "$CAIRN" ]; then
        log "building cairn"
        (cd "$ROOT" && cargo build --release -p cairn)
    fi
    [ -x "$CAIRN" ] || die "no cairn binary at $CAIRN"
}

# -------------------------------------------------------------- timing ----
declare -A T=() M=() NOTE=()
CMDS_FILE=/dev/null

# run_timed OP TOOL 'shell command'   (runs in the current dir, via bash -c)
run_timed() {
    local op=$1 tool=$2 cmd=$3 out secs kb
    printf '+ [%s/%s] %s\n' "$op" "$tool" "$cmd" | tee -a "$CMDS_FILE" >&2
    out=$(mktemp)
    if ! /usr/bin/time -f '%e s %M KB' -o "$out" bash -c "$cmd" >"$LOGDIR/$tool-$op.log" 2>&1; then
        cat "$out" >&2; tail -n 30 "$LOGDIR/$tool-$op.log" >&2
        die "$tool $op failed (log: $LOGDIR/$tool-$op.log)"
    fi
    read -r secs _ kb _ < <(tail -n 1 "$out"); rm -f "$out"
    T[$op|$tool]=$secs; M[$op|$tool]=$kb
    printf '   -> %s s, %s KB peak RSS\n' "$secs" "$kb" >&2
}

# run_best N 'cleanup cmd' OP TOOL 'cmd': run N times (cleanup, untimed, before each),
# report the median wall time and the highest RSS; all times go to ALL[].
declare -A ALL=()
run_best() {
    local n=$1 cleanup=$2 op=$3 tool=$4 cmd=$5 i bm=0 times=()
    for ((i = 1; i <= n; i++)); do
        bash -c "$cleanup"
        run_timed "$op" "$tool" "$cmd"
        ALL[$op|$tool]+="${ALL[$op|$tool]:+/}${T[$op|$tool]}"
        times+=("${T[$op|$tool]}")
        [ "${M[$op|$tool]}" -gt "$bm" ] && bm=${M[$op|$tool]}
    done
    T[$op|$tool]=$(printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END{print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
    M[$op|$tool]=$bm
}
RUNS=${RUNS:-3}   # runs of every operation; the median is reported

warm() { cat "$@" > /dev/null; }                      # page-cache warm, untimed
warm_dir() { find "$@" -type f -exec cat {} + > /dev/null; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
alloc_bytes() { du -B1 "$1" | cut -f1; }

# ----------------------------------------------------------- the image ----
make_images() {     # -> $IMG/base.img, $IMG/changed.img (cached, stamped)
    IMG=$W/images-${SIZE_GIB}G
    local bytes=$((SIZE_GIB * 1024 * 1024 * 1024))
    if [ -f "$IMG/stamp" ] && [ -f "$IMG/base.img" ] && [ -f "$IMG/changed.img" ]; then
        log "reusing images in $IMG"; return
    fi
    rm -rf "$IMG"; mkdir -p "$IMG"
    log "generating file tree ($SIZE_GIB GiB image, ~45% data)"
    $GEN populate "$IMG/tree" --image-bytes "$bytes" --seed "$SEED" --epoch "$EPOCH" | tee "$IMG/populate.txt"
    # Host-independent mke2fs defaults (bookworm's ext4 profile).
    cat > "$IMG/mke2fs.conf" <<'EOF'
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
    # atimes change when files are read, so pin them right before mkfs.
    find "$IMG/tree" -exec touch -h -d "@$EPOCH" {} +
    log "mkfs.ext4 -d (no mount)"
    MKE2FS_CONFIG=$IMG/mke2fs.conf SOURCE_DATE_EPOCH=$EPOCH E2FSPROGS_FAKE_TIME=$EPOCH \
        mkfs.ext4 -F -q -t ext4 -d "$IMG/tree" -U "$FS_UUID" \
        -E "root_owner=0:0,hash_seed=$HASH_SEED" -L cairnbench "$IMG/base.img" "${SIZE_GIB}G"
    # mke2fs copies the source inodes' ctime, which cannot be set: pin it.
    (cd "$IMG/tree" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.||; s|.*|sif "&" ctime @'"$EPOCH"'|'
     echo "sif / ctime @$EPOCH") > "$IMG/ctime.debugfs"
    SOURCE_DATE_EPOCH=$EPOCH E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$IMG/ctime.debugfs" "$IMG/base.img" >/dev/null 2>&1
    e2fsck -fn "$IMG/base.img" >/dev/null 2>&1 || die "generated image fails e2fsck"
    rm -rf "$IMG/tree"
    log "making the 1%-changed copy"
    cp --sparse=always "$IMG/base.img" "$IMG/changed.img"
    $GEN mutate "$IMG/changed.img" --fraction 0.01 --block 65536 --seed $((SEED + 1)) | tee -a "$IMG/populate.txt"
    (cd "$IMG" && sha256sum base.img changed.img) > "$IMG/sha256.txt"
    cat "$IMG/sha256.txt" >&2
    touch "$IMG/stamp"
}

# -------------------------------------------------------- compare mode ----
compare() {
    ensure_tools restic:restic borg:borgbackup casync:casync mkfs.ext4:e2fsprogs \
        debugfs:e2fsprogs /usr/bin/time:time zstd:zstd python3:python3
    ensure_cairn
    mkdir -p "$W"
    make_images
    local bytes=$((SIZE_GIB * 1024 * 1024 * 1024))

    R=$W/run-${SIZE_GIB}G
    rm -rf "$R"; mkdir -p "$R/data" "$R/restore" "$R/logs"
    LOGDIR=$R/logs; CMDS_FILE=$R/commands.txt
    cd "$R"

    export RESTIC_PASSWORD=x RESTIC_CACHE_DIR=$R/restic-cache
    export BORG_BASE_DIR=$R/borg-base BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
        BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
    {
        echo "# cwd: $R"
        echo "export RESTIC_PASSWORD=x RESTIC_CACHE_DIR=$R/restic-cache"
        echo "export BORG_BASE_DIR=$R/borg-base BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes"
        echo "# timed with: /usr/bin/time -f '%e s %M KB' bash -c '<cmd>'"
    } > "$CMDS_FILE"

    # Every tool backs up the same path, data/disk.img (base, then changed).
    cp --sparse=always "$IMG/base.img" data/disk.img

    log "machine limits"
    warm data/disk.img
    run_best "$RUNS" : read cat 'cat data/disk.img > /dev/null'
    run_best "$RUNS" : full zstd 'zstd -1 -T0 -q -c data/disk.img > /dev/null'

    log "full backups (each on a fresh repository)"
    echo "cairn space init cairn-space --chunk-size 4MiB --compression-level 1; restic -r restic-repo init --repository-version 2; borg init -e none borg-repo" >> "$CMDS_FILE"
    local warmc='cat data/disk.img > /dev/null'
    run_best "$RUNS" "$warmc; rm -rf cairn-space; $CAIRN space init cairn-space --chunk-size 4MiB --compression-level 1 >/dev/null" \
        full cairn "$CAIRN point create cairn-space data/disk.img --disk disk -q --json > cairn-full.json"
    run_best "$RUNS" "$warmc; rm -rf restic-repo restic-cache; restic -r restic-repo init --repository-version 2 >/dev/null 2>&1" \
        full restic 'restic -r restic-repo backup --host bench -q data/disk.img'
    run_best "$RUNS" "$warmc; rm -rf borg-repo borg-base; borg init -e none borg-repo >/dev/null 2>&1" \
        full borg 'borg create --compression zstd,1 borg-repo::full data/disk.img'
    run_best "$RUNS" "$warmc; rm -rf casync-store casync-full.caibx; mkdir -p casync-store" \
        full casync 'casync make --store=casync-store --compression=zstd casync-full.caibx data/disk.img'
    # Keep each repository as the full backup left it: every incremental run starts there.
    for d in cairn-space restic-repo restic-cache borg-repo borg-base casync-store; do
        rm -rf "$d.full"; cp -a "$d" "$d.full"
    done

    declare -A SZ0=()
    SZ0[cairn]=$(du -sb cairn-space | cut -f1)
    SZ0[restic]=$(du -sb restic-repo | cut -f1)
    SZ0[borg]=$(du -sb borg-repo | cut -f1)
    SZ0[casync]=$(du -scb casync-store casync-full.caibx | tail -n 1 | cut -f1)

    log "1%-changed image at the same path"
    rm -f data/disk.img
    cp --sparse=always "$IMG/changed.img" data/disk.img
    warm data/disk.img
    run_best "$RUNS" : incr zstd 'zstd -1 -T0 -q -c data/disk.img > /dev/null'

    back() { local c="cat data/disk.img > /dev/null"; for d in "$@"; do c+="; rm -rf $d; cp -a $d.full $d"; done; echo "$c; sync"; }
    run_best "$RUNS" "$(back cairn-space)" \
        incr cairn "$CAIRN point create cairn-space data/disk.img --disk disk --parent latest -q --json > cairn-incr.json"
    run_best "$RUNS" "$(back restic-repo restic-cache)" \
        incr restic 'restic -r restic-repo backup --host bench -q data/disk.img'
    run_best "$RUNS" "$(back borg-repo borg-base)" \
        incr borg 'borg create --compression zstd,1 borg-repo::incr data/disk.img'
    run_best "$RUNS" "$(back casync-store)" \
        incr casync 'casync make --store=casync-store --compression=zstd casync-incr.caibx data/disk.img'
    rm -rf ./*.full

    log "restore of the latest backup (+ fsync of the output)"
    check_restore() {   # TOOL FILE: must equal the changed image; then free it
        cmp "$2" "$IMG/changed.img" || die "$1 restore differs from the source"
        NOTE[alloc|$1]=$(mib "$(alloc_bytes "$2")")
        rm -rf "restore/$1"; mkdir -p "restore/$1"
    }
    mkdir -p restore/cairn restore/restic restore/borg restore/casync restore/zstd
    warm_dir cairn-space
    run_best "$RUNS" 'rm -f restore/cairn/disk.img' restore cairn "$CAIRN point restore cairn-space latest restore/cairn/disk.img -q"
    check_restore cairn restore/cairn/disk.img
    # (restic 0.14 re-creates the path as given to backup: restore/restic/data/disk.img)
    warm_dir restic-repo restic-cache
    run_best "$RUNS" 'rm -rf restore/restic/*' restore restic 'restic -r restic-repo restore latest --target restore/restic -q && sync "$(find restore/restic -type f -name disk.img)"'
    check_restore restic "$(find restore/restic -type f -name disk.img)"
    warm_dir borg-repo
    run_best "$RUNS" 'rm -rf restore/borg; mkdir -p restore/borg' restore borg 'cd restore/borg && borg extract --sparse ../../borg-repo::incr && sync data/disk.img'
    check_restore borg restore/borg/data/disk.img
    warm_dir casync-store casync-incr.caibx
    run_best "$RUNS" 'rm -f restore/casync/disk.img; mkdir -p restore/casync' restore casync 'casync extract --store=casync-store casync-incr.caibx restore/casync/disk.img && sync restore/casync/disk.img'
    check_restore casync restore/casync/disk.img
    # Machine reference: decompress a zstd -1 copy (sparse output) + fsync.
    zstd -1 -T0 -q -f data/disk.img -o ref.zst
    warm ref.zst
    run_best "$RUNS" 'rm -f restore/zstd/disk.img; mkdir -p restore/zstd' restore zstd 'zstd -d -q -f ref.zst -o restore/zstd/disk.img && sync restore/zstd/disk.img'
    check_restore zstd restore/zstd/disk.img

    log "verify (all points / read all data)"
    warm_dir cairn-space
    run_best "$RUNS" : verify cairn "$CAIRN point verify cairn-space -q"
    warm_dir restic-repo restic-cache
    run_best "$RUNS" : verify restic 'restic -r restic-repo check --read-data'
    warm_dir borg-repo
    run_best "$RUNS" : verify borg 'borg check --verify-data borg-repo'
    warm_dir casync-store
    run_best "$RUNS" : verify casync 'casync digest --store=casync-store casync-full.caibx && casync digest --store=casync-store casync-incr.caibx'
    warm ref.zst
    run_best "$RUNS" : verify zstd 'zstd -t -q ref.zst'

    declare -A SZ=()
    SZ[cairn]=$(du -sb cairn-space | cut -f1)
    SZ[restic]=$(du -sb restic-repo | cut -f1)
    SZ[borg]=$(du -sb borg-repo | cut -f1)
    SZ[casync]=$(du -scb casync-store casync-full.caibx casync-incr.caibx | tail -n 1 | cut -f1)
    SZ[zstd]=$(stat -c %s ref.zst)

    local cstats
    cstats=$(python3 - cairn-full.json cairn-incr.json <<'EOF'
import json, sys
f, i = (json.load(open(p))["stats"] for p in sys.argv[1:])
print("full: %d new / %d zero chunks, %.1f MiB written; incr: %d new / %d reused / %d zero chunks, %.1f MiB written"
      % (f["chunks_new"], f["chunks_zero"], f["bytes_written"] / 2**20,
         i["chunks_new"], i["chunks_reused"], i["chunks_zero"], i["bytes_written"] / 2**20))
EOF
)

    # ------------------------------------------------------------ report ---
    local res=$HERE/results-${SIZE_GIB}G.md
    report > "$res"
    cat "$res"
    echo >&2; echo "results written to $res; logs in $LOGDIR" >&2
}

# ratio row helper: prints "fastest peer X: cairn N× (faster|slower)"
ratio_note() {   # OP  (uses T)
    local op=$1 best="" bt="" t c=${T[$1|cairn]:-}
    for p in restic borg casync; do
        t=${T[$op|$p]:-}; [ -n "$t" ] || continue
        if [ -z "$bt" ] || awk -v a="$t" -v b="$bt" 'BEGIN{exit !(a<b)}'; then bt=$t; best=$p; fi
    done
    [ -n "$best" ] && [ -n "$c" ] || return 0
    awk -v c="$c" -v b="$bt" -v p="$best" 'BEGIN{
        if (c <= 0) c = 0.01;
        r = b / c;
        if (r >= 1) printf "cairn %.2fx faster than fastest peer (%s %.2f s)", r, p, b;
        else printf "cairn %.2fx SLOWER than fastest peer (%s %.2f s)", 1/r, p, b }'
}

report() {
    local bytes=$((SIZE_GIB * 1024 * 1024 * 1024)) op tool
    local gib_s
    gib_s() { awk -v s="$1" -v b="$bytes" 'BEGIN{ if (s<=0) s=0.01; printf "%.2f GiB/s", b/1073741824/s }'; }
    echo "# Cairn benchmark, ${SIZE_GIB} GiB ext4 image"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, kernel $(uname -r)."
    echo "cairn $("$CAIRN" --version | awk '{print $2}'), $(restic version | awk '{print $1" "$2}'), $(borg --version), casync $(casync --version | awk 'NR==1{print $2}'), zstd $(zstd --version | grep -o 'v[0-9.]*')."
    echo
    echo "Image: $(sed -n 1p "$IMG/populate.txt" | sed 's|.*: ||'); $(sed -n 2p "$IMG/populate.txt" | sed 's|.*: ||') changed. sha256 base $(awk 'NR==1{print substr($1,1,16)}' "$IMG/sha256.txt")…, changed $(awk 'NR==2{print substr($1,1,16)}' "$IMG/sha256.txt")…"
    echo "Everything warm in the page cache. Restores are checked byte-for-byte against the source (untimed)."
    echo
    echo "## Wall time (s)"
    echo
    echo "| operation | cairn | restic | borg | casync | zstd -1 -T0 | notes |"
    echo "|---|---|---|---|---|---|---|"
    echo "| page cache read (\`cat image\`) | | | | | | ${T[read|cat]} s = $(gib_s "${T[read|cat]}") |"
    local label
    for op in full incr restore verify; do
        case $op in
            full) label="full backup" ;;
            incr) label="incremental (1% changed, same path)" ;;
            restore) label="restore latest + fsync" ;;
            verify) label="verify" ;;
        esac
        printf '| %s |' "$label"
        for tool in cairn restic borg casync zstd; do printf ' %s |' "${T[$op|$tool]:--}"; done
        printf ' %s' "$(ratio_note $op)"
        case $op in
            full) printf '; cairn %s; zstd = compress to /dev/null' "$(gib_s "${T[full|cairn]}")" ;;
            incr) printf '; cairn %s (hashes every chunk)' "$(gib_s "${T[incr|cairn]}")" ;;
            restore) printf '; allocated MiB of output: cairn %s, restic %s, borg %s, casync %s; zstd = `zstd -d` of a .zst copy' \
                "${NOTE[alloc|cairn]}" "${NOTE[alloc|restic]}" "${NOTE[alloc|borg]}" "${NOTE[alloc|casync]}" ;;
            verify) printf '; cairn/restic/borg: all points, read all data; casync: `digest` of both indexes; zstd: `zstd -t`' ;;
        esac
        echo " |"
    done
    echo
    echo "## Peak RSS (MiB) and space size (MiB)"
    echo
    echo "| operation | cairn | restic | borg | casync | zstd -1 -T0 | notes |"
    echo "|---|---|---|---|---|---|---|"
    for op in full incr restore verify; do
        printf '| %s |' "$op"
        for tool in cairn restic borg casync zstd; do
            if [ -n "${M[$op|$tool]:-}" ]; then printf ' %s |' "$(awk -v k="${M[$op|$tool]}" 'BEGIN{printf "%.0f", k/1024}')"; else printf ' - |'; fi
        done
        echo " |"
    done
    local best="" bs=""
    for p in restic borg casync; do
        if [ -z "$bs" ] || [ "${SZ[$p]}" -lt "$bs" ]; then bs=${SZ[$p]}; best=$p; fi
    done
    printf '| space/repo size after both backups |'
    for tool in cairn restic borg casync zstd; do printf ' %s |' "$(mib "${SZ[$tool]}")"; done
    awk -v c="${SZ[cairn]}" -v b="$bs" -v p="$best" -v img="$bytes" 'BEGIN{
        printf " cairn %.2fx the smallest peer (%s); cairn = %.1f%% of image size; zstd = one .zst of the changed image |\n", c/b, p, 100*c/img }'
    printf '| space/repo size after full only |'
    for tool in cairn restic borg casync; do printf ' %s |' "$(mib "${SZ0[$tool]}")"; done
    echo ' - | |'
    printf '| growth from the 1%% incremental |'
    for tool in cairn restic borg casync; do printf ' %s |' "$(mib $((SZ[$tool] - SZ0[$tool])))"; done
    echo " - | changed bytes: $(mib $((bytes / 100))) MiB scattered in 64 KiB blocks |"
    echo
    echo "cairn point stats: $cstats"
    echo
    printf 'Every operation: median of %s runs (fresh repository for each full backup; the post-full repository restored before each incremental); all runs:' "$RUNS"
    for op in full incr restore verify; do for tool in cairn restic borg casync zstd; do
        [ -n "${ALL[$op|$tool]:-}" ] && printf ' %s/%s %s;' "$op" "$tool" "${ALL[$op|$tool]}"
    done; done
    echo
    echo
    echo "## Commands (cwd = run dir, via \`/usr/bin/time -f '%e s %M KB' bash -c CMD\`)"
    echo
    echo '```'
    sed "s|$R/|./|g; s|$CAIRN|cairn|g" "$CMDS_FILE" | awk '!seen[$0]++'
    echo '```'
}

# --------------------------------------------------------- memory mode ----
memory() {
    ensure_tools /usr/bin/time:time python3:python3
    ensure_cairn
    local size_gib=${MEM_SIZE_GIB:-16} data_mib=${MEM_DATA_MIB:-1024}
    local D=$W/memory img
    mkdir -p "$D"; cd "$D"
    img=sparse-${size_gib}G.img
    if [ ! -f "$img.stamp" ]; then
        log "making $img: ${size_gib} GiB sparse, ${data_mib} MiB scattered random data"
        rm -f "$img"
        # = truncate -s SIZE + 1 MiB pwrites (dd seek=...) at seeded offsets
        $GEN sparse "$img" --size $((size_gib * 1024 * 1024 * 1024)) --data $((data_mib * 1024 * 1024)) --region 1048576
        touch "$img.stamp"
    fi
    rm -rf space restored.img logs; mkdir -p logs
    LOGDIR=$D/logs; CMDS_FILE=$D/commands.txt; : > "$CMDS_FILE"
    "$CAIRN" space init space >/dev/null
    warm "$img"
    run_timed create cairn "$CAIRN point create space $img --disk disk -q"
    warm_dir space
    run_timed restore cairn "$CAIRN point restore space latest restored.img -q"
    run_timed verify cairn "$CAIRN point verify space -q"
    cmp "$img" restored.img || die "memory-mode restore differs"
    local alloc; alloc=$(mib "$(alloc_bytes restored.img)")
    local space; space=$(mib "$(du -sb space | cut -f1)")
    rm -f restored.img
    local res=$HERE/results-memory.md
    {
        echo "# Cairn memory check: ${size_gib} GiB sparse image, ${data_mib} MiB scattered random data"
        echo
        echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, cairn $("$CAIRN" --version | awk '{print $2}'). Restore checked with cmp."
        echo
        echo "| operation | wall s | peak RSS MiB |"
        echo "|---|---|---|"
        for op in create restore verify; do
            echo "| $op | ${T[$op|cairn]} | $(awk -v k="${M[$op|cairn]}" 'BEGIN{printf "%.0f", k/1024}') |"
        done
        echo
        echo "Space size $space MiB; restored file allocated $alloc MiB."
        echo
        echo '```'
        sed "s|$CAIRN|cairn|g" "$CMDS_FILE"
        echo '```'
    } > "$res"
    cat "$res"
}

case $MODE in
    compare|"") compare ;;
    memory) memory ;;
    *) die "usage: $0 [compare|memory]" ;;
esac
