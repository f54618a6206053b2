#!/usr/bin/env python3
"""Deterministic data generator for bench/run.sh (Python 3 stdlib only).

Subcommands:
  populate DIR --image-bytes N [--seed S] [--fill 0.45] [--epoch E]
      Fill DIR with a seeded mix of files totalling ~fill*N bytes:
      1/3 text-like (lines of words from a fixed vocabulary), 1/3
      semi-structured binary (fixed-size records with small random fields),
      1/3 incompressible (PRNG bytes). Modes and mtimes are fixed so that
      `mkfs.ext4 -d DIR` gives a reproducible image.
  mutate IMAGE [--fraction 0.01] [--block 65536] [--seed S]
      Overwrite fraction*size bytes of IMAGE in place, as `block`-sized
      blocks of PRNG bytes at distinct seeded block-aligned offsets spread
      over the whole image.
  sparse IMAGE --size N --data N [--region 1048576] [--seed S]
      Create a sparse IMAGE of N bytes (truncate) holding `data` bytes of
      PRNG data in `region`-sized pieces at distinct seeded offsets.

Everything comes from random.Random(seed), whose output for integer seeds
(random(), randrange(), choices(), sample(), randbytes()) is stable across
CPython 3.9+.
"""
import argparse
import os
import random
import struct
import sys

MiB = 1 << 20

VOCAB = """
the of and to in is for on that with as by at from this be are was it or an
not have has which can will all more one new their other but its were been
disk volume snapshot backup restore chunk block sector image point space
server network kernel driver memory cache buffer queue thread process file
directory inode extent journal superblock partition device controller
storage replica primary secondary failover recovery consistent incremental
compress decompress hash digest checksum verify integrity retention policy
schedule daemon client request response timeout retry error warning info
debug trace latency throughput bandwidth packet frame socket connection
session token user group permission access denied granted login logout
config option value default enabled disabled true false null none start
stop running stopped pending failed succeeded complete partial offset length
size count total average minimum maximum rate second minute hour day week
alpha beta gamma delta epsilon zeta theta lambda sigma omega vector matrix
report table index record field column row key entry list map set array
linux windows debian ubuntu postgres mysql nginx apache systemd cron ssh
http https tcp udp ipv4 ipv6 dns dhcp route gateway bridge vlan bond
""".split()

TEXT_LINES = 20000  # size of the shared line pool for text files


def human_lines(rng):
    lines = []
    for i in range(TEXT_LINES):
        kind = rng.randrange(4)
        words = rng.choices(VOCAB, k=rng.randrange(4, 16))
        if kind == 0:  # log-like
            line = "%s [%s] %s: %s id=%d" % (
                "2024-%02d-%02dT%02d:%02d:%02dZ" % (
                    rng.randrange(1, 13), rng.randrange(1, 29), rng.randrange(24),
                    rng.randrange(60), rng.randrange(60)),
                rng.choice(["INFO", "WARN", "DEBUG", "ERROR"]),
                rng.choice(VOCAB), " ".join(words), rng.randrange(1 << 20))
        elif kind == 1:  # config-like
            line = "%s.%s = %s" % (rng.choice(VOCAB), rng.choice(VOCAB), " ".join(words[:3]))
        else:  # prose
            line = " ".join(words).capitalize() + "."
        lines.append(line)
    return lines


def write_text(path, size, rng, pool):
    out = []
    n = 0
    while n < size:
        batch = rng.choices(pool, k=4096)
        s = "\n".join(batch) + "\n"
        out.append(s)
        n += len(s)
    data = "".join(out).encode()[:size]
    with open(path, "wb") as f:
        f.write(data)


REC = struct.Struct("<4sIQHHI16sI")  # 44 bytes, padded to 64


def write_records(path, size, rng):
    nrec = max(1, size // 64)
    buf = bytearray(nrec * 64)
    names = [("%s-%s" % (rng.choice(VOCAB), rng.choice(VOCAB))).encode()[:16] for _ in range(32)]
    ts = 1_700_000_000_000 + rng.randrange(1 << 30)
    base = rng.randrange(1 << 16)
    rnd = rng.randbytes(nrec * 4)  # small random fields, 4 bytes per record
    for i in range(nrec):
        ts += rnd[4 * i] % 17
        REC.pack_into(buf, i * 64, b"RECD", base + i, ts, rnd[4 * i + 1] % 8,
                      rnd[4 * i + 2], rnd[4 * i + 3] * 37, names[rnd[4 * i] % 32],
                      (base + i) ^ 0x5A5A5A5A)
    with open(path, "wb") as f:
        f.write(buf)


def write_random(path, size, rng):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def log_uniform(rng, lo, hi):
    # integer roughly log-uniform in [lo, hi]
    import math
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def populate(a):
    rng = random.Random(a.seed)
    target = int(a.image_bytes * a.fill)
    per_kind = target // 3
    pool = human_lines(random.Random(a.seed + 1))
    os.makedirs(a.dir, exist_ok=True)
    kinds = [
        ("text", ".log", 4 * 1024, 4 * MiB),
        ("records", ".dat", 64 * 1024, 16 * MiB),
        ("random", ".bin", 256 * 1024, 32 * MiB),
    ]
    files = 0
    for ki, (kind, ext, lo, hi) in enumerate(kinds):
        krng = random.Random(a.seed * 1000 + ki)
        done = 0
        idx = 0
        while done < per_kind:
            size = min(log_uniform(krng, lo, hi), per_kind - done)
            sub = os.path.join(a.dir, kind, "d%02d" % krng.randrange(12),
                               "s%d" % krng.randrange(3))
            os.makedirs(sub, exist_ok=True)
            path = os.path.join(sub, "%s-%05d%s" % (kind, idx, ext))
            if kind == "text":
                write_text(path, size, krng, pool)
            elif kind == "records":
                write_records(path, size, krng)
            else:
                write_random(path, size, krng)
            done += size
            idx += 1
            files += 1
    # Fixed modes and times for reproducibility (mke2fs -d copies them).
    for root, dirs, fnames in os.walk(a.dir, topdown=False):
        for fn in fnames:
            p = os.path.join(root, fn)
            os.chmod(p, 0o644)
            os.utime(p, (a.epoch, a.epoch))
        os.chmod(root, 0o755)
        os.utime(root, (a.epoch, a.epoch))
    print("populated %s: %d files, %d bytes (%.1f%% of image)"
          % (a.dir, files, 3 * per_kind, 100.0 * 3 * per_kind / a.image_bytes))


def mutate(a):
    rng = random.Random(a.seed)
    size = os.path.getsize(a.image)
    nblocks = size // a.block
    count = max(1, int(size * a.fraction) // a.block)
    offs = sorted(rng.sample(range(nblocks), count))
    fd = os.open(a.image, os.O_WRONLY)
    try:
        for b in offs:
            os.pwrite(fd, rng.randbytes(a.block), b * a.block)
    finally:
        os.close(fd)
    print("mutated %s: %d blocks of %d bytes (%d bytes, %.2f%%)"
          % (a.image, count, a.block, count * a.block, 100.0 * count * a.block / size))


def sparse(a):
    rng = random.Random(a.seed)
    nslots = a.size // a.region
    count = a.data // a.region
    offs = sorted(rng.sample(range(nslots), count))
    with open(a.image, "wb") as f:
        f.truncate(a.size)
        for s in offs:
            f.seek(s * a.region)
            f.write(rng.randbytes(a.region))
    print("sparse %s: %d bytes, %d regions of %d bytes random data"
          % (a.image, a.size, count, a.region))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = p.add_subparsers(dest="cmd", required=True)
    q = sp.add_parser("populate")
    q.add_argument("dir")
    q.add_argument("--image-bytes", type=int, required=True)
    q.add_argument("--seed", type=int, default=42)
    q.add_argument("--fill", type=float, default=0.45)
    q.add_argument("--epoch", type=int, default=1700000000)
    q.set_defaults(fn=populate)
    q = sp.add_parser("mutate")
    q.add_argument("image")
    q.add_argument("--fraction", type=float, default=0.01)
    q.add_argument("--block", type=int, default=65536)
    q.add_argument("--seed", type=int, default=4242)
    q.set_defaults(fn=mutate)
    q = sp.add_parser("sparse")
    q.add_argument("image")
    q.add_argument("--size", type=int, required=True)
    q.add_argument("--data", type=int, required=True)
    q.add_argument("--region", type=int, default=MiB)
    q.add_argument("--seed", type=int, default=1616)
    q.set_defaults(fn=sparse)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
