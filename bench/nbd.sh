#!/usr/bin/env bash
# NBD server throughput: Cairn's server (cairn-nbd's serve_file example) against
# qemu-nbd and nbdkit (file plugin), serving the same raw file, in one run.
# Usage: bash bench/nbd.sh   (SIZE_MIB=1024 RUNTIME=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
for t in fio nbdkit qemu-nbd nbdcopy bc; do
  command -v "$t" >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio nbdkit qemu-utils libnbd-bin bc; break; }
done
cargo build --release -q -p cairn-nbd --example serve_file
SERVE=$PWD/target/release/examples/serve_file
W=${BENCH_DIR:-$PWD/bench/work}/nbd; mkdir -p "$W"
SIZE_MIB=${SIZE_MIB:-1024}; RUNTIME=${RUNTIME:-5}
[ -f "$W/f.img" ] || head -c "$((SIZE_MIB << 20))" /dev/urandom > "$W/f.img"
cat "$W/f.img" > /dev/null
URI=nbd://127.0.0.1:10900/e
iops() { fio --name=p --ioengine=nbd --uri="$URI" --rw="$1" --bs=4k --iodepth="$2" --size="${SIZE_MIB}M" \
          --time_based --runtime="$RUNTIME" --group_reporting 2>/dev/null | grep -oE 'IOPS=[0-9.k]+' | head -1 | cut -d= -f2; }
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
probe() {
  local name=$1; shift
  "$@" & local pid=$!; sleep 0.7
  local rr1 rr32 rw1 rw32 sr sw
  rr1=$(iops randread 1); rr32=$(iops randread 32); rw1=$(iops randwrite 1); rw32=$(iops randwrite 32)
  sr=$(secs nbdcopy "$URI" "$W/out.img"); sw=$(secs nbdcopy "$W/f.img" "$URI")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  printf '| %s | %s | %s | %s | %s | %.2f | %.2f |\n' "$name" "$rr1" "$rr32" "$rw1" "$rw32" "$sr" "$sw"
}
echo "| server | 4k randread qd1 IOPS | qd32 | 4k randwrite qd1 IOPS | qd32 | seq read ${SIZE_MIB} MiB (s) | seq write (s) |"
echo "|---|---|---|---|---|---|---|"
probe cairn "$SERVE" "$W/f.img" 127.0.0.1:10900 e
probe qemu-nbd qemu-nbd -f raw -t -p 10900 -b 127.0.0.1 -x e "$W/f.img"
probe nbdkit nbdkit -f -p 10900 -i 127.0.0.1 --exportname=e file "$W/f.img"
