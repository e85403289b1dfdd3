//! Power-loss test: prepare, serving with guest writes and flushes, hydration, commit,
//! rollback and area removal run on a [`PowerLossDisk`] whose power is cut after a seeded
//! random number of storage operations. The disk that remains (durable bytes plus a
//! random subset of the unflushed writes, some torn at 512-byte sectors) is reopened,
//! checked (flushed writes present, no foreign bytes, rollback before commit exact) and
//! the operation resumed to the end. At least 200 cuts per run, seeded: the seed is
//! printed and STREAMBOOT_SEED replays a run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use boot_relocator::{relocate, MetaStore, PreparePhase, PrepareSpec, State, Storage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use streamboot::engine::{Engine, EngineOptions, HydrateOptions, Hydrator};
use streamboot::source::{FileSource, RemoteSource};
use streamboot::target::target_record;

use common::disk::sha256;
use common::powerloss::{PowerLossDisk, SECTOR};

const CHUNK: u64 = 4096;
const SOURCE_LEN: usize = 300_000;
const TARGET_LEN: usize = 360_000 - 123;
/// Guest writes stay below this, so dirty chunks always fit the small area.
const WRITE_LIMIT: usize = 100_000;
/// Cuts to land per test run.
const MIN_CUTS: usize = 240;
const SECTOR_USZ: usize = SECTOR as usize;

/// One test configuration: the images, the pinned target, the disk geometry.
struct Fixture {
    _dir: tempfile::TempDir,
    source: Vec<u8>,
    target: Vec<u8>,
    src: Arc<dyn RemoteSource>,
    /// Cap on the released area (None: room for the whole target).
    area: Option<u64>,
}

impl Fixture {
    fn new(seed: u64, area: Option<u64>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = common::random_bytes(seed, SOURCE_LEN);
        let mut target = common::random_bytes(seed + 1, TARGET_LEN);
        // A zero run, so zero chunks (never stored) take part.
        target[200_000..240_000].fill(0);
        let path = dir.path().join("target.img");
        std::fs::write(&path, &target).unwrap();
        let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&path, None).unwrap());
        Fixture {
            _dir: dir,
            source,
            target,
            src,
            area,
        }
    }

    fn spec(&self) -> PrepareSpec {
        PrepareSpec {
            chunk_size: CHUNK,
            target_size: TARGET_LEN as u64,
            target: target_record(self.src.as_ref(), &[self.src.name()]),
            boot_ranges: std::iter::once(0..40_000).collect(),
            area_size: self.area,
            source_size: None,
            max_trial_starts: 3,
            area: None,
            discard_free_space: false,
        }
    }

    /// Runs a whole prepare on `st` (which may lose power midway).
    fn prepare(&self, st: Arc<dyn Storage>) -> boot_relocator::Result<MetaStore> {
        let spec = self.spec();
        let plan = relocate::plan(st.as_ref(), &spec, &self.target[..])?;
        relocate::prepare(
            st,
            &spec,
            &plan,
            [9; 16],
            0,
            &mut |o, b| self.src.read_at(o, b).map_err(|e| e.to_string()),
            &mut |_, _, _| {},
        )
    }

    /// Resumes an interrupted prepare on `meta` the way `streamboot prepare` does.
    fn resume_prepare(
        &self,
        st: Arc<dyn Storage>,
        mut meta: MetaStore,
    ) -> boot_relocator::Result<()> {
        if meta.superblock().phase == PreparePhase::MapReady {
            return relocate::resume_prepare(
                &mut meta,
                &mut |o, b| self.src.read_at(o, b).map_err(|e| e.to_string()),
                &mut |_, _, _| {},
            );
        }
        relocate::remove_area(&mut meta)?;
        self.prepare(st).map(drop)
    }

    fn engine(&self, st: Arc<dyn Storage>) -> Engine {
        let meta = MetaStore::open(st).unwrap().expect("prepared");
        // Small fetches and frequent map commits: many chunk states and commit points.
        let opts = EngineOptions {
            demand_fetch_bytes: 2 * CHUNK,
            commit_every_bytes: 8 * CHUNK,
        };
        Engine::new(meta, self.src.clone(), opts).unwrap()
    }

    /// Every byte the disk presents: the engine's view, or the plain image.
    fn presented(&self, st: &Arc<PowerLossDisk>) -> Vec<u8> {
        let dyn_st: Arc<dyn Storage> = st.clone();
        match MetaStore::open(dyn_st.clone()).unwrap() {
            None => image_of(st),
            Some(m) if m.state() == State::Committed => image_of(st)[..TARGET_LEN].to_vec(),
            Some(_) => {
                let e = self.engine(dyn_st);
                let mut all = vec![0u8; TARGET_LEN];
                e.read(0, &mut all).unwrap();
                all
            }
        }
    }
}

/// The whole current image of a disk that has power.
fn image_of(st: &PowerLossDisk) -> Vec<u8> {
    let mut v = vec![0u8; st.len().unwrap() as usize];
    st.read_at(0, &mut v).unwrap();
    v
}

/// Content of sector-aligned guest write `i` at byte `at`: every sector names its writer.
fn tagged(seed: u64, i: u64, at: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (s, sec) in v.chunks_mut(SECTOR_USZ).enumerate() {
        let tag = format!("seed {seed} write {i} sector {};", at / SECTOR_USZ + s);
        for (k, x) in sec.iter_mut().enumerate() {
            *x = tag.as_bytes()[k % tag.len()];
        }
    }
    v
}

/// What a reopened disk may present after a cut during guest I/O: `flushed` is every
/// byte acknowledged before the last completed flush; a sector may instead hold any
/// later write to it (acknowledged or in flight, whole or torn).
struct Expect {
    flushed: Vec<u8>,
    maybe: HashMap<usize, Vec<Vec<u8>>>,
}

impl Expect {
    fn new(model: Vec<u8>) -> Self {
        Expect {
            flushed: model,
            maybe: HashMap::new(),
        }
    }
    fn unflushed(&mut self, at: usize, data: &[u8]) {
        for (s, sec) in data.chunks(SECTOR_USZ).enumerate() {
            self.maybe
                .entry(at / SECTOR_USZ + s)
                .or_default()
                .push(sec.to_vec());
        }
    }
    fn flushed(&mut self, model: &[u8]) {
        self.flushed.copy_from_slice(model);
        self.maybe.clear();
    }
    fn check(&self, bytes: &[u8], what: &str) {
        assert_eq!(bytes.len(), self.flushed.len(), "{what}: wrong size");
        for (s, sec) in bytes.chunks(SECTOR_USZ).enumerate() {
            let at = s * SECTOR_USZ;
            let ok = sec == &self.flushed[at..at + sec.len()]
                || self
                    .maybe
                    .get(&s)
                    .is_some_and(|v| v.iter().any(|m| m[..sec.len()] == *sec));
            assert!(
                ok,
                "{what}: sector {s} (byte {at}) holds bytes that were never written there"
            );
        }
    }
}

/// Per-phase run counts.
#[derive(Default)]
struct Counts(BTreeMap<&'static str, usize>);

impl Counts {
    fn add(&mut self, phase: &'static str) {
        *self.0.entry(phase).or_default() += 1;
    }
    fn total(&self) -> usize {
        self.0.values().sum()
    }
}

/// A fresh disk holding `image`, with the power cut planned after `cut` operations.
fn disk_with_cut(image: Vec<u8>, cut: Option<u64>) -> Arc<PowerLossDisk> {
    let d = Arc::new(PowerLossDisk::new(image, false));
    if let Some(n) = cut {
        d.cut_after(n);
    }
    d
}

/// The disk after the power came back: a crash image on a fresh storage.
fn reboot(d: &PowerLossDisk, rng: &mut ChaCha8Rng) -> Arc<PowerLossDisk> {
    Arc::new(PowerLossDisk::new(d.crash_image(rng), false))
}

/// Operations an uncut `f` issues on a disk holding `image`.
fn ops_of(image: &[u8], f: impl FnOnce(Arc<PowerLossDisk>)) -> u64 {
    let d = Arc::new(PowerLossDisk::new(image.to_vec(), false));
    f(d.clone());
    d.ops()
}

/// Rolls the disk back and asserts the source comes back bit for bit.
fn rollback_exact(fx: &Fixture, d: &Arc<PowerLossDisk>, what: &str) {
    let dyn_st: Arc<dyn Storage> = d.clone();
    if let Some(mut m) = MetaStore::open(dyn_st).unwrap() {
        assert!(
            m.state().source_recoverable() || m.state() == State::RolledBack,
            "{what}: state {} cannot roll back",
            m.state()
        );
        relocate::rollback(&mut m, &mut |_, _, _| {}).unwrap();
    }
    assert_eq!(
        sha256(&image_of(d)),
        sha256(&fx.source),
        "{what}: rollback did not restore the source bit for bit"
    );
}

/// Commits (or finishes an interrupted commit) and returns the disk's whole image.
fn commit_to_end(fx: &Fixture, d: &Arc<PowerLossDisk>) -> Vec<u8> {
    let dyn_st: Arc<dyn Storage> = d.clone();
    match MetaStore::open(dyn_st.clone()).unwrap() {
        None => {}
        Some(mut m) if m.state() == State::Committed => relocate::remove_area(&mut m).unwrap(),
        Some(_) => fx
            .engine(dyn_st)
            .commit(true, small_hydrate(), &|_, _, _| {})
            .unwrap(),
    }
    image_of(d)
}

fn small_hydrate() -> HydrateOptions {
    HydrateOptions {
        threads: 2,
        request_bytes: 4 * CHUNK,
        profile: Vec::new(),
    }
}

/// Random guest I/O on a prepared disk until the power fails or `n` operations ran.
/// Returns the expectation for the disk after the cut.
fn guest_io(
    fx: &Fixture,
    d: Arc<PowerLossDisk>,
    wseed: u64,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Expect {
    let dyn_st: Arc<dyn Storage> = d.clone();
    let engine = fx.engine(dyn_st);
    // A prepared disk presents the target.
    let mut model = fx.target.clone();
    let mut exp = Expect::new(model.clone());
    for i in 0..n as u64 {
        let r = match rng.random_range(0..100) {
            0..=49 => {
                // Sector-aligned writes, up to two chunks long.
                let s = rng.random_range(0..WRITE_LIMIT / SECTOR_USZ - 16);
                let k = rng.random_range(1..=16);
                let (at, len) = (s * SECTOR_USZ, k * SECTOR_USZ);
                let data = tagged(wseed, i, at, len);
                exp.unflushed(at, &data);
                let r = engine.write(at as u64, &data).map_err(|e| e.to_string());
                if r.is_ok() {
                    model[at..at + len].copy_from_slice(&data);
                }
                r
            }
            50..=59 => {
                let c = rng.random_range(0..WRITE_LIMIT / CHUNK as usize);
                let at = c * CHUNK as usize;
                exp.unflushed(at, &vec![0u8; CHUNK as usize]);
                let r = engine
                    .write_zeroes(at as u64, CHUNK)
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    model[at..at + CHUNK as usize].fill(0);
                }
                r
            }
            60..=79 => {
                let r = engine.flush().map_err(|e| e.to_string());
                if r.is_ok() {
                    exp.flushed(&model);
                }
                r
            }
            _ => {
                // Reads see every acknowledged write, flushed or not.
                let at = rng.random_range(0..TARGET_LEN);
                let len = rng
                    .random_range(1..=3 * CHUNK as usize)
                    .min(TARGET_LEN - at);
                let mut buf = vec![0u8; len];
                let r = engine.read(at as u64, &mut buf).map_err(|e| e.to_string());
                if r.is_ok() {
                    assert!(
                        buf == model[at..at + len],
                        "read {at}+{len} before the cut differs"
                    );
                }
                r
            }
        };
        if r.is_err() {
            assert!(d.is_dead(), "guest op {i} failed with power on: {r:?}");
            break;
        }
    }
    exp
}

/// Seed of this run (printed; STREAMBOOT_SEED replays it).
fn seed() -> u64 {
    std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// A random cut among the `total` operations of an uncut run (`total`: no cut at all).
fn pick_cut(rng: &mut ChaCha8Rng, total: u64) -> u64 {
    rng.random_range(0..=total)
}

#[test]
fn power_cut_at_random_points() {
    let seed = seed();
    println!("power-loss seed {seed} (STREAMBOOT_SEED={seed} to replay)");
    let mut counts = Counts::default();
    let mut round = 0u64;
    // Cut prepares that left a plain but longer file (no superblock landed).
    let mut grown = 0usize;
    // Roomy area (nothing evicted) and a small one (40 slots for 88 chunks: eviction).
    let fixtures = [
        Fixture::new(seed, None),
        Fixture::new(seed ^ 0x55, Some(44 * CHUNK)),
    ];
    let templates: Vec<Templates> = fixtures.iter().map(|fx| Templates::new(fx, seed)).collect();

    while counts.total() < MIN_CUTS {
        round += 1;
        let k = (round % 2) as usize;
        let (fx, t) = (&fixtures[k], &templates[k]);
        let what = |phase: &str| format!("seed {seed} round {round} {phase}");
        let mut r = common::test_rng(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));

        // prepare, then resume or roll back.
        let cut = pick_cut(&mut r, t.prepare_ops);
        let d = disk_with_cut(fx.source.clone(), Some(cut));
        let res = fx.prepare(d.clone());
        assert_eq!(
            res.is_ok(),
            !d.is_dead(),
            "{}: prepare result",
            what("prepare")
        );
        drop(res);
        counts.add("prepare");
        let d2 = reboot(&d, &mut r);
        let dyn2: Arc<dyn Storage> = d2.clone();
        match MetaStore::open(dyn2.clone()).unwrap() {
            None => {
                // Cut before the first superblock was durable: the source is untouched;
                // a file that grew carries the growth record, which gives the length back.
                if image_of(&d2).len() > SOURCE_LEN {
                    grown += 1;
                }
                boot_relocator::growth::undo_interrupted_growth(&dyn2).unwrap();
                assert!(
                    image_of(&d2) == fx.source,
                    "{}: plain disk is not the source",
                    what("prepare")
                );
            }
            Some(m) if r.random_bool(0.5) => {
                drop(m);
                rollback_exact(fx, &d2, &what("rollback after cut prepare"));
            }
            Some(m) => {
                if m.state() == State::Preparing {
                    fx.resume_prepare(dyn2, m).unwrap();
                }
                assert!(
                    fx.presented(&d2) == fx.target,
                    "{}: resumed prepare presents wrong bytes",
                    what("prepare")
                );
            }
        }

        // Guest writes, zeroings, flushes and reads, cut at random.
        let wseed = seed ^ round << 24;
        let d = disk_with_cut(t.prepared.clone(), Some(r.random_range(0..400)));
        let exp = guest_io(fx, d.clone(), wseed, 150, &mut r);
        counts.add("guest writes");
        let d2 = reboot(&d, &mut r);
        exp.check(&fx.presented(&d2), &what("after cut guest writes"));
        if r.random_bool(0.3) {
            rollback_exact(fx, &d2, &what("rollback after cut guest writes"));
        } else {
            let before = fx.presented(&d2);
            let img = commit_to_end(fx, &d2);
            assert!(
                img == before,
                "{}: commit changed the presented bytes",
                what("guest writes")
            );
        }

        // Hydration of a disk with flushed writes: presented bytes never change.
        let d = disk_with_cut(t.written.clone(), Some(pick_cut(&mut r, t.hydrate_ops)));
        let engine = fx.engine(d.clone());
        let _ = Hydrator::new(small_hydrate(), 0).run(&engine, &|_, _| {});
        drop(engine);
        counts.add("hydrate");
        let d2 = reboot(&d, &mut r);
        assert!(
            fx.presented(&d2) == t.written_model,
            "{}: presented bytes changed",
            what("hydrate")
        );

        // Commit: resumable, ends as target + flushed writes.
        let d = disk_with_cut(t.written.clone(), Some(pick_cut(&mut r, t.commit_ops)));
        let res = fx
            .engine(d.clone())
            .commit(true, small_hydrate(), &|_, _, _| {});
        assert_eq!(
            res.is_ok(),
            !d.is_dead(),
            "{}: commit result",
            what("commit")
        );
        counts.add("commit");
        let d2 = reboot(&d, &mut r);
        assert!(
            fx.presented(&d2) == t.written_model,
            "{}: presented bytes differ after the cut",
            what("commit")
        );
        let state = MetaStore::probe(d2.as_ref()).unwrap().map(|sb| sb.state);
        if state.is_some_and(|s| s.source_recoverable()) && r.random_bool(0.3) {
            rollback_exact(fx, &d2, &what("rollback after cut commit"));
        } else {
            assert!(
                commit_to_end(fx, &d2) == t.written_model,
                "{}: resumed commit is not target + flushed writes",
                what("commit")
            );
        }

        // Rollback: resumable, ends as the source.
        let d = disk_with_cut(t.written.clone(), Some(pick_cut(&mut r, t.rollback_ops)));
        let dyn_st: Arc<dyn Storage> = d.clone();
        let mut m = MetaStore::open(dyn_st).unwrap().unwrap();
        let res = relocate::rollback(&mut m, &mut |_, _, _| {});
        assert_eq!(
            res.is_ok(),
            !d.is_dead(),
            "{}: rollback result",
            what("rollback")
        );
        drop(m);
        counts.add("rollback");
        let d2 = reboot(&d, &mut r);
        rollback_exact(fx, &d2, &what("rollback"));

        // Area removal after rollback and after commit.
        for (img, want) in [
            (&t.rolled_back, &fx.source),
            (&t.committed, &t.written_model),
        ] {
            let d = disk_with_cut(img.clone(), Some(r.random_range(0..=2)));
            let dyn_st: Arc<dyn Storage> = d.clone();
            let mut m = MetaStore::open(dyn_st).unwrap().unwrap();
            let _ = relocate::remove_area(&mut m);
            counts.add("remove area");
            let d2 = reboot(&d, &mut r);
            let dyn2: Arc<dyn Storage> = d2.clone();
            if let Some(mut m) = MetaStore::open(dyn2).unwrap() {
                relocate::remove_area(&mut m).unwrap();
            }
            assert!(
                image_of(&d2) == **want,
                "{}: image after area removal",
                what("remove area")
            );
        }
    }
    println!(
        "power-loss seed {seed}: {} cuts in {round} rounds {:?}; {grown} cut prepares left a plain file longer than the source (given back its length)",
        counts.total(),
        counts.0
    );
    assert!(counts.total() >= 200);
}

/// Regression (seed 9363248126102755158): the first superblock pair was one write, and a
/// cut that tore it left magic-bearing, damaged copies: the disk read as corrupted. Every
/// cut in the first superblock write and every tearing must leave a disk that opens
/// (plain, or preparing).
#[test]
fn torn_first_superblock_never_reads_as_corrupted() {
    let fx = Fixture::new(1, None);
    // The cut lands on the first writes and syncs of prepare (superblocks, map).
    for cut in 0..6 {
        for s in 0..64 {
            let d = disk_with_cut(fx.source.clone(), Some(cut));
            assert!(fx.prepare(d.clone()).is_err());
            let d2 = reboot(&d, &mut common::test_rng(s));
            let dyn2: Arc<dyn Storage> = d2.clone();
            match MetaStore::open(dyn2) {
                Ok(None) => assert!(image_of(&d2)[..SOURCE_LEN] == fx.source[..]),
                Ok(Some(m)) => assert_eq!(m.state(), State::Preparing),
                Err(e) => panic!("cut {cut} tearing {s}: {e}"),
            }
        }
    }
}

/// Disk images each phase starts from, and the operation counts of uncut runs.
struct Templates {
    prepared: Vec<u8>,
    /// Prepared, with flushed guest writes.
    written: Vec<u8>,
    written_model: Vec<u8>,
    /// Durable images in state `rolled-back` / `committed`, area not yet removed.
    rolled_back: Vec<u8>,
    committed: Vec<u8>,
    prepare_ops: u64,
    hydrate_ops: u64,
    commit_ops: u64,
    rollback_ops: u64,
}

impl Templates {
    fn new(fx: &Fixture, seed: u64) -> Self {
        let d = disk_with_cut(fx.source.clone(), None);
        fx.prepare(d.clone()).unwrap();
        let prepare_ops = d.ops();
        let prepared = image_of(&d);

        let d = disk_with_cut(prepared.clone(), None);
        let mut written_model = fx.target.clone();
        {
            let e = fx.engine(d.clone());
            let mut rng = common::test_rng(seed ^ 7);
            for i in 0..30u64 {
                let at = rng.random_range(0..WRITE_LIMIT / SECTOR_USZ - 16) * SECTOR_USZ;
                let len = rng.random_range(1..=16) * SECTOR_USZ;
                let data = tagged(seed, 1_000_000 + i, at, len);
                e.write(at as u64, &data).unwrap();
                written_model[at..at + len].copy_from_slice(&data);
            }
            e.write_zeroes(8 * CHUNK, CHUNK).unwrap();
            written_model[8 * CHUNK as usize..9 * CHUNK as usize].fill(0);
            e.flush().unwrap();
        }
        let written = image_of(&d);

        let hydrate_ops = ops_of(&written, |d| {
            let e = fx.engine(d);
            Hydrator::new(small_hydrate(), 0)
                .run(&e, &|_, _| {})
                .unwrap();
        });
        let commit_ops = ops_of(&written, |d| {
            fx.engine(d)
                .commit(true, small_hydrate(), &|_, _, _| {})
                .unwrap();
        });
        let rollback_ops = ops_of(&written, |d| {
            let mut m = MetaStore::open(d).unwrap().unwrap();
            relocate::rollback(&mut m, &mut |_, _, _| {}).unwrap();
        });
        // The durable image just before the area is removed: cut at the last operation.
        // A commit's operation count can differ from run to run (its background fetches
        // run on several threads), so the count is measured again with each try until
        // the cut lands after the final state was written.
        let last_cut = |f: &dyn Fn(Arc<PowerLossDisk>), want: State| {
            for _ in 0..32 {
                let ops = ops_of(&written, f);
                let d = disk_with_cut(written.clone(), Some(ops - 1));
                f(d.clone());
                let img = d.durable();
                let probe = PowerLossDisk::new(img.clone(), false);
                if MetaStore::probe(&probe).unwrap().map(|sb| sb.state) == Some(want) {
                    return img;
                }
            }
            panic!("no cut before the area's removal left the disk {want:?}");
        };
        let rolled_back = last_cut(
            &|d| {
                let mut m = MetaStore::open(d).unwrap().unwrap();
                let _ = relocate::rollback(&mut m, &mut |_, _, _| {});
            },
            State::RolledBack,
        );
        let committed = last_cut(
            &|d| {
                let _ = fx.engine(d).commit(true, small_hydrate(), &|_, _, _| {});
            },
            State::Committed,
        );
        println!(
            "uncut operation counts: prepare {prepare_ops} hydrate {hydrate_ops} commit {commit_ops} rollback {rollback_ops}"
        );
        Templates {
            prepared,
            written,
            written_model,
            rolled_back,
            committed,
            prepare_ops,
            hydrate_ops,
            commit_ops,
            rollback_ops,
        }
    }
}
