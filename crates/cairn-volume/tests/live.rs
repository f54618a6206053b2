//! Live disks end to end, in process: a real pool and space on disk, the real NBD server
//! on a Unix socket, and a small NBD client that knows exactly which writes were
//! acknowledged (the interop with real clients is in cairn-nbd's and cairn's tests).
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cairn_format::config::SpaceConfig;
use cairn_store::Space;
use cairn_store::progress::NoProgress;
use cairn_store::restore::{RestoreOptions, restore_disk};
use cairn_volume::host::{self, Host};
use cairn_volume::{Pool, VolumeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

struct Setup {
    dir: tempfile::TempDir,
    host: Arc<Host>,
    socket: PathBuf,
}

async fn setup(disks: &[(&str, u64)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sp = dir.path().join("space");
    let backend = cairn_store::space::open_location(sp.to_str().unwrap(), true).unwrap();
    let space = Space::init(backend, SpaceConfig::new(64 << 10, 1).unwrap())
        .await
        .unwrap();
    let pool = Pool::init(
        &dir.path().join("pool"),
        "here",
        sp.to_str().unwrap(),
        space.config().id,
    )
    .unwrap();
    pool.create_server("db", None, None).unwrap();
    for (d, size) in disks {
        host::create_disk(&pool, "db", d, *size).unwrap();
    }
    let host = Host::open(&dir.path().join("pool")).await.unwrap();
    // Clones fill only as read (or hydrated by a test), so tests see them unhydrated.
    host.set_background_hydration(false);
    let socket = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let exports: Arc<dyn cairn_nbd::server::Exports> = host.clone();
    tokio::spawn(cairn_nbd::server::serve_unix(listener, exports));
    Setup { dir, host, socket }
}

/// A minimal NBD client: fixed newstyle, EXPORT_NAME, simple replies, one request at a time.
struct Client {
    s: UnixStream,
    handle: u64,
}

impl Client {
    async fn connect(socket: &Path, export: &str) -> std::io::Result<Client> {
        let mut s = UnixStream::connect(socket).await?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await?;
        s.write_all(&3u32.to_be_bytes()).await?;
        let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt).await?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info).await?;
        Ok(Client { s, handle: 0 })
    }

    async fn request(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        self.handle += 1;
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.s.write_all(&req).await?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply).await?;
        let err = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        if err != 0 {
            return Err(std::io::Error::other(format!("nbd error {err}")));
        }
        let mut out = Vec::new();
        if kind == 0 {
            out.resize(len as usize, 0);
            self.s.read_exact(&mut out).await?;
        }
        Ok(out)
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.request(1, offset, data.len() as u32, data)
            .await
            .map(|_| ())
    }

    async fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.request(0, offset, len, &[]).await
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const BLOCK: u64 = 4096;

fn block_of(seq: u64) -> Vec<u8> {
    seq.to_le_bytes().repeat(BLOCK as usize / 8)
}

async fn restore(space: &Space, id: &cairn_format::id::PointId, disk: &str, out: &Path) -> Vec<u8> {
    let record = space.load_point(id).await.unwrap();
    restore_disk(
        space,
        &record,
        Some(disk),
        out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .await
    .unwrap();
    std::fs::read(out).unwrap()
}

/// The point equals the server's disks at one instant: across both disks, exactly the
/// writes up to some sequence number K, with K at least every write acknowledged before
/// the point was asked for, and below every write sent after it was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_of_a_running_server_are_consistent_across_disks() {
    const SIZE: u64 = 4 << 20;
    let s = setup(&[("a", SIZE), ("b", SIZE)]).await;
    s.host.start("db").await.unwrap();
    let blocks = SIZE / BLOCK;

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, socket) = (acked.clone(), stop.clone(), s.socket.clone());
        tokio::spawn(async move {
            let mut a = Client::connect(&socket, "db/a").await.unwrap();
            let mut b = Client::connect(&socket, "db/b").await.unwrap();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut log = Vec::new();
            let mut seq = 1u64;
            while !stop.load(Ordering::Acquire) {
                let disk = seq % 2;
                let block = rng.next() % blocks;
                let c = if disk == 0 { &mut a } else { &mut b };
                c.write(block * BLOCK, &block_of(seq)).await.unwrap();
                log.push((seq, disk, block));
                acked.store(seq, Ordering::Release);
                seq += 1;
            }
            log
        })
    };

    let space = s.host.space().unwrap().clone();
    let mut rng = Rng(12345);
    let mut points = Vec::new();
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(rng.next() % 30)).await;
        let before = acked.load(Ordering::Acquire);
        let p = s
            .host
            .take_point("db", "test", "test", &NoProgress)
            .await
            .unwrap();
        let after = acked.load(Ordering::Acquire) + 1;
        points.push((p.record.id, before, after));
    }
    stop.store(true, Ordering::Release);
    let log = writer.await.unwrap();
    assert!(log.len() > 100, "the writer wrote during the points");
    let overlapped = points.iter().filter(|(_, b, a)| a - b > 2).count();
    assert!(
        overlapped >= 6,
        "writes were acknowledged while points were taken ({overlapped} of 12)"
    );

    for (i, (id, before, after)) in points.iter().enumerate() {
        let da = restore(&space, id, "a", &s.dir.path().join(format!("a{i}"))).await;
        let db = restore(&space, id, "b", &s.dir.path().join(format!("b{i}"))).await;
        let seq_at = |d: &[u8], blk: u64| {
            u64::from_le_bytes(
                d[(blk * BLOCK) as usize..(blk * BLOCK) as usize + 8]
                    .try_into()
                    .unwrap(),
            )
        };
        let k = (0..blocks)
            .flat_map(|blk| [seq_at(&da, blk), seq_at(&db, blk)])
            .max()
            .unwrap();
        assert!(
            k >= *before,
            "point {i}: write {before} was acknowledged before the point but is missing (K={k})"
        );
        assert!(
            k < *after,
            "point {i}: holds write {k}, sent after the point was taken"
        );
        let mut want = [vec![0u64; blocks as usize], vec![0u64; blocks as usize]];
        for &(seq, disk, blk) in log.iter().take_while(|w| w.0 <= k) {
            want[disk as usize][blk as usize] = seq;
        }
        for blk in 0..blocks {
            assert_eq!(
                seq_at(&da, blk),
                want[0][blk as usize],
                "point {i}, disk a, block {blk}"
            );
            assert_eq!(
                seq_at(&db, blk),
                want[1][blk as usize],
                "point {i}, disk b, block {blk}"
            );
            let whole = |d: &[u8]| d[(blk * BLOCK) as usize..((blk + 1) * BLOCK) as usize].to_vec();
            assert_eq!(
                whole(&da),
                if want[0][blk as usize] == 0 {
                    vec![0; BLOCK as usize]
                } else {
                    block_of(want[0][blk as usize])
                }
            );
        }
    }
    s.host.stop("db").await.unwrap();
}

/// With a valid changed-block map, a point reads only the changed chunks; after an
/// unclean shutdown it reads everything, stores only what changed, and is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_block_tracking_and_its_loss() {
    const SIZE: u64 = 16 << 20;
    let s = setup(&[("a", SIZE)]).await;
    s.host.start("db").await.unwrap();
    let mut c = Client::connect(&s.socket, "db/a").await.unwrap();
    let noise = cairn_format::testdata::noise(1, SIZE as usize);
    for off in (0..SIZE).step_by(1 << 20) {
        c.write(off, &noise[off as usize..(off + (1 << 20)) as usize])
            .await
            .unwrap();
    }
    let first = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        first.record.stats.bytes_read, SIZE,
        "the first point reads everything"
    );
    // Change 3 chunks.
    for off in [0u64, 5 << 20, (15 << 20) + 4096] {
        c.write(off, &[7u8; 4096]).await.unwrap();
    }
    let second = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert_eq!(second.tracked, vec![("a".to_string(), true)]);
    assert_eq!(
        second.record.stats.bytes_read,
        3 * (64 << 10),
        "only the changed chunks are read"
    );
    assert_eq!(second.record.parent, Some(first.record.id));
    drop(c);

    // An unclean shutdown leaves the map file as it is while the disk is open (the CLI
    // tests kill a real serving process; here the file is put in that state).
    s.host.stop("db").await.unwrap();
    let pool_root = s.dir.path().join("pool");
    let space = s.host.space().unwrap().clone();
    let host = s.host.clone();
    let pool = Pool::open(&pool_root).unwrap();
    let paths = pool.disk_paths("db", "a");
    cairn_volume::mapfile::write(
        &paths.cbt,
        &cairn_volume::volume::CbtHeader {
            state: cairn_volume::volume::CbtState::Open,
            grain: cairn_volume::volume::GRAIN,
            size: SIZE,
            base: None,
        },
        &cairn_volume::bitmap::Bitmap::new(0),
    )
    .unwrap();
    let data = paths.data;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&[9u8; 4096], 8 << 20).unwrap();
    }
    let third = host.take_point("db", "t", "t", &NoProgress).await.unwrap();
    assert_eq!(
        third.tracked,
        vec![("a".to_string(), false)],
        "the map of an unclosed disk is not trusted"
    );
    assert_eq!(
        third.record.stats.bytes_read, SIZE,
        "the fallback reads everything"
    );
    assert_eq!(
        third.record.stats.chunks_new, 1,
        "and stores only what changed"
    );
    let restored = restore(&space, &third.record.id, "a", &pool_root.join("r")).await;
    assert_eq!(restored, std::fs::read(&data).unwrap());
    // Closed cleanly by take_point: the next point is incremental again.
    let fourth = host.take_point("db", "t", "t", &NoProgress).await.unwrap();
    assert_eq!(fourth.record.stats.bytes_read, 0);
}

/// A clone serves the point's content at once, merges partial writes, survives an
/// interrupted hydration, pins its point until hydrated, and is independent afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_copy_on_read_and_hydrate() {
    const SIZE: u64 = 8 << 20;
    let s = setup(&[("a", SIZE)]).await;
    let pool_root = s.dir.path().join("pool");
    let pool = Pool::open(&pool_root).unwrap();
    let noise = cairn_format::testdata::noise(2, SIZE as usize);
    std::fs::write(pool.disk_paths("db", "a").data, &noise).unwrap();
    let point = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap()
        .record;
    let space = s.host.space().unwrap().clone();

    pool.create_server("copy", None, None).unwrap();
    let m = host::clone_disk(&pool, &space, &point.id, None, "copy", "a")
        .await
        .unwrap();
    assert!(m.origin.is_some());
    // The point cannot be deleted while the clone reads from it.
    let err = cairn_store::gc::delete_points(&space, &[point.id])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("here:copy/a"), "{err}");

    s.host.start("copy").await.unwrap();
    let mut c = Client::connect(&s.socket, "copy/a").await.unwrap();
    assert_eq!(
        c.read(100_000, 5000).await.unwrap(),
        noise[100_000..105_000]
    );
    c.write((3 << 20) + 10, b"merged").await.unwrap();
    let mut want = noise.clone();
    want[(3 << 20) + 10..(3 << 20) + 16].copy_from_slice(b"merged");
    assert_eq!(
        c.read(3 << 20, 64 << 10).await.unwrap(),
        want[3 << 20..(3 << 20) + (64 << 10)]
    );
    c.request(3, 0, 0, &[]).await.unwrap(); // flush
    drop(c);
    s.host.stop("copy").await.unwrap();

    // Hydration interrupted half way, then resumed after reopening.
    let (tx, rx) = tokio::sync::watch::channel(false);
    {
        let _lock = pool.lock_server("copy", "test").unwrap();
        let v = cairn_volume::volume::Volume::open(
            &pool,
            &pool.disk("copy", "a").unwrap(),
            Some(&space),
        )
        .await
        .unwrap();
        let n = AtomicU64::new(0);
        v.hydrate(
            1,
            &|_| {
                if n.fetch_add(1, Ordering::AcqRel) == 20 {
                    tx.send_replace(true);
                }
            },
            &rx,
        )
        .await
        .unwrap();
        let (present, total, _) = v.hydration().unwrap();
        assert!(present < total, "stopped early ({present}/{total})");
        v.close().await.unwrap();
    }
    s.host.hydrate("copy", "a", &NoProgress).await.unwrap();
    assert!(
        pool.disk("copy", "a").unwrap().origin.is_none(),
        "hydrated: no longer a clone"
    );
    assert_eq!(
        std::fs::read(pool.disk_paths("copy", "a").data).unwrap(),
        want
    );
    // Unpinned: the point can go, and the clone stays whole.
    cairn_store::gc::delete_points(&space, &[point.id])
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(pool.disk_paths("copy", "a").data).unwrap(),
        want
    );
}

/// Rollback needs the server stopped, compares only what the map says changed, and
/// leaves the disk equal to the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_rewrites_only_what_changed() {
    const SIZE: u64 = 16 << 20;
    let s = setup(&[("a", SIZE)]).await;
    let pool = Pool::open(&s.dir.path().join("pool")).unwrap();
    let space = s.host.space().unwrap().clone();
    s.host.start("db").await.unwrap();
    let mut c = Client::connect(&s.socket, "db/a").await.unwrap();
    let noise = cairn_format::testdata::noise(3, SIZE as usize);
    c.write(0, &noise[..4 << 20]).await.unwrap();
    let point = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap()
        .record;
    c.write(1 << 20, &[1u8; 8192]).await.unwrap();
    c.write(10 << 20, &[2u8; 100]).await.unwrap();
    drop(c);
    let err = host::rollback_server(&pool, &space, &point.id, "db", None, true, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, VolumeError::Running { .. }), "{err}");
    s.host.stop("db").await.unwrap();
    let plan = host::rollback_server(&pool, &space, &point.id, "db", None, false, &NoProgress)
        .await
        .unwrap();
    assert_eq!(plan[0].method, "changed-block map");
    // The map names two grains: only they are rewritten (nothing read to compare).
    assert_eq!(plan[0].bytes_compared, 0);
    assert_eq!(plan[0].bytes_to_rewrite, 2 * (64 << 10));
    assert_eq!(plan[0].chunks_differing, 2);
    let done = host::rollback_server(&pool, &space, &point.id, "db", None, true, &NoProgress)
        .await
        .unwrap();
    assert_eq!(done[0].chunks_differing, 2);
    let mut want = noise[..4 << 20].to_vec();
    want.resize(SIZE as usize, 0);
    assert_eq!(
        std::fs::read(pool.disk_paths("db", "a").data).unwrap(),
        want
    );
    // The point is the new base: nothing to compare next time.
    let again = host::rollback_server(&pool, &space, &point.id, "db", None, false, &NoProgress)
        .await
        .unwrap();
    assert_eq!(again[0].bytes_to_rewrite, 0);
}

/// A clone only in the location holding the point's space; names without path tricks;
/// sizes checked; disks of a running server cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly() {
    let s = setup(&[("a", 1 << 20)]).await;
    let pool = Pool::open(&s.dir.path().join("pool")).unwrap();
    let point = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap()
        .record;

    let other = s.dir.path().join("other");
    let backend = cairn_store::space::open_location(other.to_str().unwrap(), true).unwrap();
    let other = Space::init(backend, SpaceConfig::new(64 << 10, 1).unwrap())
        .await
        .unwrap();
    let err = host::clone_disk(&pool, &other, &point.id, None, "db", "c")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("only be made in the location"),
        "{err}"
    );

    for bad in ["../x", "a/b/c", "", ".hidden", "-flag"] {
        assert!(cairn_volume::pool::parse_disk_spec(bad).is_err(), "{bad}");
    }
    assert!(host::create_disk(&pool, "db", "../../etc", 1 << 20).is_err());
    let e = host::create_disk(&pool, "db", "odd", 1000).unwrap_err();
    assert!(e.to_string().contains("multiple of 512"), "{e}");
    let e = host::create_disk(&pool, "nosuch", "d", 1 << 20).unwrap_err();
    assert!(e.to_string().contains("cairn server create"), "{e}");
    let e = host::create_disk(&pool, "db", "a", 1 << 20).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");

    s.host.start("db").await.unwrap();
    let e = host::delete_disk(&pool, "db", "a").unwrap_err();
    assert!(e.to_string().contains("running"), "{e}");
    let e = host::grow_disk(&pool, "db", "a", 2 << 20).unwrap_err();
    assert!(e.to_string().contains("running"), "{e}");
    s.host.stop("db").await.unwrap();
    let e = host::grow_disk(&pool, "db", "a", 512).unwrap_err();
    assert!(e.to_string().contains("shrinking"), "{e}");
    host::grow_disk(&pool, "db", "a", 2 << 20).unwrap();
    // A grown disk: the next point reads it whole, and is right.
    let p = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert_eq!(p.record.disks[0].size, 2 << 20);
    assert!(!p.tracked[0].1);
}

/// Stopping a server disconnects its clients: nothing reaches the disk afterwards (an
/// offline rollback may be rewriting it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_server_disconnects_its_clients() {
    let s = setup(&[("a", 1 << 20)]).await;
    s.host.start("db").await.unwrap();
    let mut c = Client::connect(&s.socket, "db/a").await.unwrap();
    c.write(0, &[1u8; 4096]).await.unwrap();
    s.host.stop("db").await.unwrap();
    assert!(
        c.write(0, &[2u8; 4096]).await.is_err(),
        "a write after stop fails"
    );
    let pool = Pool::open(&s.dir.path().join("pool")).unwrap();
    let data = std::fs::read(pool.disk_paths("db", "a").data).unwrap();
    assert_eq!(data[..4096], [1u8; 4096]);
    assert!(
        Client::connect(&s.socket, "db/a").await.is_err(),
        "no export of a stopped server"
    );
}

/// Pre and post hooks run around the freeze; a failing pre hook aborts the point and
/// names the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_around_the_freeze() {
    let s = setup(&[]).await;
    let pool = Pool::open(&s.dir.path().join("pool")).unwrap();
    let marker = s.dir.path().join("hooks.log");
    let m = marker.display();
    pool.create_server(
        "app",
        Some(format!("echo \"pre $CAIRN_SERVER\" >> {m}")),
        Some(format!("echo \"post $CAIRN_SERVER\" >> {m}")),
    )
    .unwrap();
    host::create_disk(&pool, "app", "a", 1 << 20).unwrap();
    s.host
        .take_point("app", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "pre app\npost app\n"
    );

    pool.create_server(
        "bad",
        Some("echo 'guest agent unreachable' >&2; exit 3".into()),
        None,
    )
    .unwrap();
    host::create_disk(&pool, "bad", "a", 1 << 20).unwrap();
    let e = s
        .host
        .take_point("bad", "t", "t", &NoProgress)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("pre hook") && msg.contains("guest agent unreachable"),
        "{msg}"
    );
    assert!(!pool.disk_paths("bad", "a").cow.exists(), "nothing frozen");
}

/// Deleting a server's latest point (its disks' change base) does not block the next
/// point: it is taken whole, with a warning, and tracking resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_base_point_costs_one_full_read() {
    let s = setup(&[("a", 4 << 20)]).await;
    let space = s.host.space().unwrap().clone();
    s.host.start("db").await.unwrap();
    let mut c = Client::connect(&s.socket, "db/a").await.unwrap();
    c.write(0, &[3u8; 65536]).await.unwrap();
    let first = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap()
        .record;
    cairn_store::gc::delete_points(&space, &[first.id])
        .await
        .unwrap();
    c.write(1 << 20, &[4u8; 4096]).await.unwrap();
    let second = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert_eq!(second.warnings.len(), 1, "{:?}", second.warnings);
    let third = s
        .host
        .take_point("db", "t", "t", &NoProgress)
        .await
        .unwrap();
    assert!(third.tracked[0].1 && third.record.stats.bytes_read == 0);
    let out = s.dir.path().join("r");
    let got = restore(&space, &second.record.id, "a", &out).await;
    assert_eq!(got[..65536], [3u8; 65536]);
    assert_eq!(got[1 << 20..(1 << 20) + 4096], [4u8; 4096]);
}
