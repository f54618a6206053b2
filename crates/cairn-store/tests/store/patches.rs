//! Patches: incremental points of a change-tracked source store only the changed 64 KiB
//! grains of a chunk, over the base chunk (only their changed 4 KiB blocks, as deltas,
//! where the source tracks blocks). Checked against the source's real content
//! through every reader: restore, grain-range fetches, rollback of ranges, verify, GC.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cairn_format::config::SpaceConfig;
use cairn_format::id::PointId;
use cairn_format::layout;
use cairn_store::SpaceError;
use cairn_store::create::{CreateOptions, ParentChoice, create_point_from};
use cairn_store::fetch::fetch_range;
use cairn_store::progress::NoProgress;
use cairn_store::source::{ChangeBase, ChunkSource, NamedSource};
use cairn_store::{Space, gc, rollback, verify};

use crate::common::{noise, restored, rt};

const GRAIN: u64 = 64 * 1024;
const CHUNK: u64 = 1 << 20;
const SIZE: u64 = 8 * CHUNK + 3 * GRAIN; // a short last chunk

/// A disk in memory that knows which grains (and, if `blocks`, which 4 KiB blocks of
/// them) changed since its base point.
struct Tracked {
    data: Mutex<Vec<u8>>,
    base: Mutex<Option<PointId>>,
    changed: Mutex<BTreeMap<u64, u16>>,
    blocks: bool,
}

impl Tracked {
    /// A disk holding `content`, with no point yet, tracking grains.
    fn new(content: Vec<u8>) -> Arc<Tracked> {
        Self::tracking(content, false)
    }

    fn tracking(content: Vec<u8>, blocks: bool) -> Arc<Tracked> {
        Arc::new(Tracked {
            data: Mutex::new(content),
            base: Mutex::new(None),
            changed: Mutex::new(BTreeMap::new()),
            blocks,
        })
    }

    fn write(&self, at: u64, bytes: &[u8]) {
        self.data.lock().unwrap()[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let mut c = self.changed.lock().unwrap();
        let end = at + bytes.len() as u64;
        for g in at / GRAIN..end.div_ceil(GRAIN) {
            let (from, to) = (
                at.max(g * GRAIN) - g * GRAIN,
                end.min((g + 1) * GRAIN) - g * GRAIN,
            );
            let mask = cairn_format::framed::delta_mask(from as usize, to as usize, 4096);
            *c.entry(g).or_default() |= mask;
        }
    }
}

struct Source(Arc<Tracked>);

impl ChunkSource for Source {
    fn size(&self) -> u64 {
        SIZE
    }
    fn describe(&self) -> String {
        "memory".into()
    }
    fn may_have_data(&self, _: u64, _: u64) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SpaceError> {
        let d = self.0.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn change_base(&self) -> Option<ChangeBase> {
        (*self.0.base.lock().unwrap()).map(|point| ChangeBase {
            point,
            disk: "root".into(),
        })
    }
    fn changed(&self, start: u64, end: u64) -> bool {
        self.0
            .changed
            .lock()
            .unwrap()
            .range(start / GRAIN..end.div_ceil(GRAIN))
            .next()
            .is_some()
    }
    fn changed_blocks(&self, start: u64, _end: u64) -> u16 {
        match self.0.blocks {
            true => self.0.changed.lock().unwrap()[&(start / GRAIN)],
            false => u16::MAX,
        }
    }
}

async fn take(space: &Space, t: &Arc<Tracked>) -> cairn_format::record::PointRecord {
    let mut opts = CreateOptions::new(vec![]);
    opts.parent = match *t.base.lock().unwrap() {
        Some(p) => ParentChoice::Id(p),
        None => ParentChoice::None,
    };
    let src = NamedSource {
        name: "root".into(),
        source: Arc::new(Source(t.clone())),
    };
    let r = create_point_from(space, &opts, &[src], &NoProgress)
        .await
        .unwrap();
    *t.base.lock().unwrap() = Some(r.id);
    t.changed.lock().unwrap().clear();
    r
}

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

/// A space in a local folder `space` under `dir`.
async fn local_space(dir: &std::path::Path) -> Space {
    let root = dir.join("space");
    std::fs::create_dir_all(&root).unwrap();
    let backend: Arc<dyn cairn_store::backend::Backend> =
        Arc::new(cairn_store::backend::ObjectStoreBackend::local(&root).unwrap());
    Space::init(backend, SpaceConfig::new(CHUNK, 3).unwrap())
        .await
        .unwrap()
}

#[test]
fn a_zero_chunk_written_in_one_grain_reads_one_grain_and_dedups_before_compressing() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let space = local_space(dir.path()).await;
        let mut content = noise(3, SIZE as usize);
        content[2 * CHUNK as usize..4 * CHUNK as usize].fill(0); // two zero chunks
        let t = Tracked::new(content);
        take(&space, &t).await;
        let bytes = noise(11, 4096);
        t.write(2 * CHUNK + 100, &bytes);
        let r = take(&space, &t).await;
        assert_eq!(r.stats.bytes_read, GRAIN, "{:?}", r.stats);
        assert_eq!(r.stats.chunks_new, 1, "{:?}", r.stats);
        assert!(restored(&space, &r, "root", dir.path()).await == *t.data.lock().unwrap());
        // The same bytes at the same place of the other zero chunk: the same chunk, found
        // stored by its id and not stored again.
        t.write(3 * CHUNK + 100, &bytes);
        let r = take(&space, &t).await;
        assert_eq!(r.stats.bytes_read, GRAIN, "{:?}", r.stats);
        assert_eq!(
            (r.stats.chunks_new, r.stats.bytes_written),
            (0, 0),
            "{:?}",
            r.stats
        );
        assert!(restored(&space, &r, "root", dir.path()).await == *t.data.lock().unwrap());
    });
}

/// A 4 KiB write stores about 4 KiB: a delta of the one block over the base's grain;
/// the next write to another block of the same grain stores both (over the same base).
#[test]
fn a_write_of_one_block_stores_one_block() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let space = local_space(dir.path()).await;
        let t = Tracked::tracking(noise(5, SIZE as usize), true);
        take(&space, &t).await;
        let at = 3 * CHUNK + 5 * GRAIN + 2 * 4096;
        t.write(at, &noise(6, 4096));
        let r = take(&space, &t).await;
        assert_eq!(r.stats.bytes_read, GRAIN, "{:?}", r.stats);
        assert_eq!(r.stats.bytes_new, 4096, "{:?}", r.stats);
        let table = 56 + 40 * CHUNK / GRAIN;
        assert!(r.stats.bytes_written <= table + 4 + 4096, "{:?}", r.stats);
        let idx = space.load_index(&r, &r.disks[0]).await.unwrap();
        let patch = std::fs::read(
            dir.path()
                .join("space")
                .join(layout::object_key(&idx.chunk_ref(3))),
        )
        .unwrap();
        assert_eq!(patch[4], cairn_format::framed::VERSION_DELTA);
        assert!(restored(&space, &r, "root", dir.path()).await == *t.data.lock().unwrap());

        // Another block of the same grain (an unaligned write over two blocks), and the
        // last block of another chunk (its first patch: a delta over a standalone chunk).
        t.write(at + 9 * 4096 + 100, &noise(7, 5000));
        t.write(8 * CHUNK - 10, &noise(8, 10));
        let r = take(&space, &t).await;
        assert_eq!(r.stats.bytes_read, 2 * GRAIN, "{:?}", r.stats);
        assert_eq!(r.stats.bytes_new, 4 * 4096, "{:?}", r.stats);
        let want = t.data.lock().unwrap().clone();
        assert!(restored(&space, &r, "root", dir.path()).await == want);
        let idx = space.load_index(&r, &r.disks[0]).await.unwrap();
        for (c, a, b) in [
            (3, 5 * GRAIN, 6 * GRAIN),
            (3, 5 * GRAIN + 8000, 5 * GRAIN + 9000),
        ] {
            let got = fetch_range(
                space.backend(),
                idx.chunk_ref(c),
                CHUNK as usize,
                a as usize..b as usize,
            )
            .await
            .unwrap();
            assert!(got == want[(c * CHUNK + a) as usize..(c * CHUNK + b) as usize]);
        }
        assert!(
            verify::verify(&space, &[], 4, &NoProgress)
                .await
                .unwrap()
                .is_clean()
        );
    });
}

#[test]
fn patches_restore_fetch_rollback_verify_and_survive_gc() {
    patches_through_every_reader(false);
}

#[test]
fn delta_patches_restore_fetch_rollback_verify_and_survive_gc() {
    patches_through_every_reader(true);
}

fn patches_through_every_reader(blocks: bool) {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let space = local_space(dir.path()).await;
        let mut content = noise(7, SIZE as usize);
        content[2 * CHUNK as usize..3 * CHUNK as usize].fill(0); // a zero chunk
        let t = Tracked::tracking(content, blocks);
        let mut points = vec![(take(&space, &t).await, t.data.lock().unwrap().clone())];
        let mut seed = 42u64;
        for round in 0..6u64 {
            // A few small writes: most chunks get a patch; one chunk changes a lot (whole).
            for _ in 0..6 {
                let at = lcg(&mut seed) % (SIZE - 9000);
                let len = 1 + lcg(&mut seed) % 9000;
                t.write(at, &noise(round * 100 + at, len as usize));
            }
            let big = (round % 8) * CHUNK;
            t.write(big, &noise(round + 999, (CHUNK / 2) as usize));
            if round == 2 {
                // Written back to what the base holds: same id as before.
                let same = points.last().unwrap().1[5 * CHUNK as usize..][..4096].to_vec();
                t.write(5 * CHUNK, &same);
            }
            let r = take(&space, &t).await;
            points.push((r, t.data.lock().unwrap().clone()));
        }
        // Patches were written, and every point restores to its content.
        let last = &points.last().unwrap().0;
        let idx = space.load_index(last, &last.disks[0]).await.unwrap();
        assert!(!idx.bases.is_empty(), "the latest point holds patches");
        assert!(
            last.stats.bytes_new < CHUNK * 4,
            "an incremental stores changed grains, not chunks: {:?}",
            last.stats
        );
        for (p, want) in &points {
            assert!(
                restored(&space, p, "root", dir.path()).await == *want,
                "point {}",
                p.id
            );
        }
        // Grain-range fetches of a patch and of a standalone chunk.
        let mut x = 5u64;
        for _ in 0..40 {
            let c = lcg(&mut x) % idx.chunks.len() as u64;
            let r = idx.chunk_ref(c);
            if r.id.is_zero() {
                continue;
            }
            let (s, e) = idx.chunk_range(c);
            let len = (e - s) as usize;
            let a = (lcg(&mut x) as usize) % len;
            let b = a + 1 + (lcg(&mut x) as usize) % (len - a);
            let got = fetch_range(space.backend(), r, len, a..b).await.unwrap();
            assert!(got == points.last().unwrap().1[s as usize + a..s as usize + b]);
        }
        // Rollback of ranges: diverge an image, roll back only those ranges.
        let img = dir.path().join("disk.img");
        let mut diverged = points.last().unwrap().1.clone();
        let mut ranges = Vec::new();
        for k in 0..12u64 {
            let at = (k * 700_001) % (SIZE - 5000);
            diverged[at as usize..at as usize + 5000].fill(0xAB);
            ranges.push((at, at + 5000));
        }
        std::fs::write(&img, &diverged).unwrap();
        let plan = rollback::plan_rollback_ranges(&space, last, None, &img, ranges)
            .await
            .unwrap();
        assert!(plan.bytes_to_rewrite < SIZE / 4, "{plan:?}");
        rollback::apply_rollback(&space, last, &plan, 4, &NoProgress)
            .await
            .unwrap();
        assert!(std::fs::read(&img).unwrap() == points.last().unwrap().1);
        // GC after deleting every point but the latest keeps the patches' bases.
        let old: Vec<PointId> = points[..points.len() - 1].iter().map(|p| p.0.id).collect();
        gc::delete_points(&space, &old).await.unwrap();
        let opts = gc::GcOptions {
            grace: std::time::Duration::ZERO,
            ..gc::GcOptions::default()
        };
        let report = gc::gc(&space, &opts, &NoProgress).await.unwrap();
        assert!(report.chunks_deleted > 0, "{report:?}");
        assert!(restored(&space, last, "root", dir.path()).await == points.last().unwrap().1);
        assert!(
            verify::verify(&space, &[], 4, &NoProgress)
                .await
                .unwrap()
                .is_clean()
        );
        // A damaged base is found through the patch that reads it.
        let (&pos, &base) = idx.bases.iter().next().unwrap();
        let path = dir.path().join("space").join(layout::chunk_key(&base));
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let report = verify::verify(&space, &[], 4, &NoProgress).await.unwrap();
        assert!(
            report
                .damage
                .iter()
                .any(|d| d.chunk == Some(idx.chunks[pos as usize])),
            "{:?}",
            report.damage
        );
    });
}
