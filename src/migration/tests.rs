//! The offline operations through the library API: typed reports, typed refusals that
//! change nothing, and the whole lifecycle on a file disk with a file target.

use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};

use super::*;

const MIB: usize = 1 << 20;

struct Disk {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    source: Vec<u8>,
    target: Vec<u8>,
    target_path: String,
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn setup(seed: u64) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let source = bytes(seed, 3 * MIB + 777);
    let target = bytes(seed + 1000, 2 * MIB + 4097);
    std::fs::write(&disk, &source).unwrap();
    let t = dir.path().join("target.img");
    std::fs::write(&t, &target).unwrap();
    Disk {
        _dir: dir,
        disk,
        source,
        target,
        target_path: t.display().to_string(),
    }
}

impl Disk {
    fn prepare(&self) -> PrepareReport {
        let mut o = PrepareOptions::new(self.disk.clone(), vec![self.target_path.clone()]);
        o.chunk_size = Some(64 << 10);
        prepare(&o, &Quiet).unwrap()
    }

    fn commit(&self, force: bool) -> Result<CommitReport> {
        commit(
            &CommitOptions {
                disk: self.disk.clone(),
                force,
                targets: Vec::new(),
                http: HttpOptions::default(),
                relocate_backup_gpt: false,
            },
            &Quiet,
        )
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.disk).unwrap()
    }
}

/// The refusal is the table's, for this disk, and the disk is unchanged.
fn refused(disk: &Path, before: &[u8], r: Result<impl std::fmt::Debug>, op: Op, reason: Reason) {
    match r {
        Err(MigrationError::Conflict { path, source }) => {
            assert_eq!(path, disk);
            assert_eq!((source.op, source.reason), (op, reason), "{source}");
        }
        other => panic!("expected a {op:?} conflict ({reason:?}), got {other:?}"),
    }
    assert!(
        std::fs::read(disk).unwrap() == before,
        "a refusal changed the disk"
    );
}

#[test]
fn prepare_confirm_commit_gives_the_target() {
    let d = setup(1);
    let r = d.prepare();
    assert!(!r.resumed);
    assert_eq!(r.status.state, "prepared");
    assert!(r.area_offset >= d.source.len() as u64);
    let before = d.bytes();
    refused(
        &d.disk,
        &before,
        d.commit(false),
        Op::Commit,
        Reason::NotConfirmed,
    );
    let again = PrepareOptions::new(d.disk.clone(), vec![d.target_path.clone()]);
    refused(
        &d.disk,
        &before,
        prepare(&again, &Quiet),
        Op::Prepare,
        Reason::AlreadyPrepared,
    );

    let c = confirm(&d.disk).unwrap();
    assert_eq!((c.state, c.already), ("confirmed", false));
    assert!(confirm(&d.disk).unwrap().already);
    let h = hydrate(
        &HydrateRequest {
            disk: d.disk.clone(),
            targets: Vec::new(),
            rate: 0,
            threads: 2,
            http: HttpOptions::default(),
        },
        &Quiet,
    )
    .unwrap();
    assert_eq!(h.report.missing, 0);
    let r = d.commit(false).unwrap();
    assert_eq!((r.state, r.resumed), ("committed", None));
    assert!(d.bytes() == d.target, "the disk is not the target");
    let s = status(&d.disk).unwrap();
    assert!(!s.prepared && s.status.is_none());
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v, serde_json::json!({"prepared": false}));
}

#[test]
fn rollback_gives_the_source_and_closes_the_lifecycle() {
    let d = setup(2);
    d.prepare();
    confirm(&d.disk).unwrap();
    let r = rollback(&d.disk, &Quiet).unwrap();
    assert_eq!(r.state, "rolled-back");
    assert!(
        r.guest_writes_discarded,
        "a confirmed target may hold guest writes"
    );
    assert!(d.bytes() == d.source, "the disk is not the source");
    // A plain disk again: every lifecycle operation says so and changes nothing.
    let before = d.bytes();
    for r in [confirm(&d.disk).map(|_| ()), d.commit(true).map(|_| ())] {
        assert!(
            matches!(r, Err(MigrationError::NotPrepared { .. })),
            "{r:?}"
        );
    }
    assert!(d.bytes() == before);
}

#[test]
fn a_forced_commit_from_prepared_gives_the_target() {
    let d = setup(3);
    d.prepare();
    let r = d.commit(true).unwrap();
    assert!(r.status.is_some());
    assert!(d.bytes() == d.target);
}

#[test]
fn a_disk_left_committed_finishes_without_the_target_and_refuses_rollback() {
    let d = setup(4);
    d.prepare();
    confirm(&d.disk).unwrap();
    // A commit that "crashed" after recording `committed` (only the refusals and the
    // finish step are under test, not the bytes).
    {
        let st: std::sync::Arc<dyn boot_relocator::Storage> =
            std::sync::Arc::new(boot_relocator::FileStorage::open(&d.disk, true).unwrap());
        let mut meta = MetaStore::open(st).unwrap().unwrap();
        meta.set_state(State::Committing).unwrap();
        meta.set_state(State::Committed).unwrap();
    }
    let before = d.bytes();
    let r = rollback(&d.disk, &Quiet);
    refused(&d.disk, &before, r, Op::Rollback, Reason::CommitStarted);
    let r = confirm(&d.disk);
    refused(&d.disk, &before, r, Op::Confirm, Reason::CommitStarted);
    // The target file is gone: finishing needs no target.
    std::fs::remove_file(&d.target_path).unwrap();
    let r = d.commit(false).unwrap();
    assert_eq!(r.resumed, Some(true));
    let v = serde_json::to_value(&r).unwrap();
    assert!(v.get("status").is_none() && v["resumed"] == true, "{v}");
    assert!(!status(&d.disk).unwrap().prepared);
}

#[test]
fn bad_options_are_refused_before_the_disk_is_opened() {
    let d = setup(5);
    let mut o = PrepareOptions::new(d.disk.clone(), vec![d.target_path.clone()]);
    o.insecure_unverified_index = true;
    assert!(matches!(prepare(&o, &Quiet), Err(MigrationError::Usage(_))));
    o.insecure_unverified_index = false;
    o.chunk_size = Some(3000);
    assert!(matches!(
        prepare(&o, &Quiet),
        Err(MigrationError::ChunkSize(_))
    ));
    assert!(d.bytes() == d.source);
}
