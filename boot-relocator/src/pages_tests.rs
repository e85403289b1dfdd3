//! Unit tests of the paged map: pages leave memory only once both disk copies hold
//! them, and what is read back (from memory or disk, before or after reopening) is
//! always the latest entry.

use std::sync::Arc;

use crate::format::{
    Entry, Layout, Location, PreparePhase, State, Superblock, TargetRecord, ENTRIES_PER_PAGE,
};
use crate::hostkey::HostKey;
use crate::meta::MetaStore;
use crate::storage::{FileStorage, Storage};

const CHUNKS: u64 = 1024; // five map pages of 4 KiB chunks
const SLOTS: u64 = 256;

fn sb() -> Superblock {
    let map_pages = CHUNKS.div_ceil(ENTRIES_PER_PAGE as u64);
    Superblock {
        generation: 1,
        uuid: [3; 16],
        state: State::Preparing,
        phase: PreparePhase::Reserved,
        start_counter: 0,
        max_trial_starts: 3,
        layout: Layout {
            chunk_shift: 12,
            disk_len: 8 << 20,
            source_size: 4 << 20,
            target_size: CHUNKS << 12,
            area_offset: 5 << 20,
            map_offset: 5 << 20,
            map_pages,
            slot_offset: 6 << 20,
            slot_count: SLOTS,
        },
        target: TargetRecord {
            kind: "http".into(),
            validator: "v".into(),
            urls: vec!["http://127.0.0.1:1/t".into()],
        },
        created_unix: 1_700_000_000,
        seeded_bytes: 0,
        release: Default::default(),
    }
}

fn key() -> HostKey {
    HostKey::from_bytes([4; 32])
}

fn storage(path: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(path, true).unwrap())
}

fn all(m: &MetaStore) -> Vec<Entry> {
    (0..CHUNKS).map(|c| m.entry(c).unwrap()).collect()
}

#[test]
fn pages_leave_memory_only_when_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut m = MetaStore::create_with_key(storage(&path), key(), sb(), &[3, 600]).unwrap();
    m.init_map().unwrap();
    m.set_page_cache_pages(1);
    let mut model = vec![Entry::MISSING; CHUNKS as usize];
    model[3].boot = true;
    model[600].boot = true;
    assert_eq!(all(&m), model);
    assert_eq!(m.resident_pages(), (0, 1));

    // Changes on every page: all pinned, whatever the cache bound.
    for c in (0..CHUNKS).step_by(100) {
        let s = m.alloc_slot().unwrap();
        let e = Entry {
            loc: Location::Slot(s),
            ..model[c as usize]
        };
        m.set_entry(c, e).unwrap();
        model[c as usize] = e;
    }
    assert_eq!(
        m.resident_pages().0,
        4,
        "chunks 0..=1000 step 100 lie on pages 0..=3"
    );
    assert_eq!(all(&m), model);

    // A batch in flight; page 0 changes again meanwhile: it stays pinned afterwards.
    let batch = m.take_dirty().unwrap();
    m.set_entry(
        1,
        Entry {
            loc: Location::Zero,
            ..model[1]
        },
    )
    .unwrap();
    model[1].loc = Location::Zero;
    batch.write(m.storage().as_ref(), m.layout()).unwrap();
    m.finish_batch(batch);
    assert_eq!(
        m.resident_pages().0,
        1,
        "only the page changed again stays pinned"
    );
    assert_eq!(all(&m), model, "entries read back from the disk");

    // A failed batch: its pages are dirty and pinned again.
    let batch = m.take_dirty().unwrap();
    m.abort_batch(batch);
    assert_eq!(m.resident_pages().0, 1);
    assert!(m.has_pending());
    m.commit().unwrap();
    assert_eq!(m.resident_pages().0, 0);
    assert!(m.resident_pages().1 <= 1);
    assert_eq!(all(&m), model);
    let counts = m.counts();
    assert_eq!((counts.slotted, counts.zero), (11, 1));
    assert_eq!(counts.missing, CHUNKS - 12);

    // Reopened: the same entries, the same free slots, the same counts.
    m.update_sb(|sb| sb.state = State::Prepared).unwrap();
    let free = m.free_slots();
    drop(m);
    let m = MetaStore::open_with_key(storage(&path), key())
        .unwrap()
        .unwrap();
    assert_eq!(all(&m), model);
    assert_eq!(m.free_slots(), free);
    assert_eq!(m.counts(), counts);
    let mut scanned = Vec::new();
    m.scan(|_, e| scanned.push(e)).unwrap();
    assert_eq!(scanned, model);
}

#[test]
fn slots_go_lowest_first_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut m = MetaStore::create_with_key(storage(&path), key(), sb(), &[]).unwrap();
    m.init_map().unwrap();
    let a: Vec<u32> = (0..SLOTS).map(|_| m.alloc_slot().unwrap()).collect();
    assert_eq!(a, (0..SLOTS as u32).collect::<Vec<_>>());
    assert_eq!(m.alloc_slot(), None);
    m.free_unpublished(7);
    m.free_unpublished(3);
    assert_eq!(m.free_slots(), 2);
    assert_eq!(m.alloc_slot(), Some(3));
    assert_eq!(m.alloc_slot(), Some(7));
    // A published slot that is unmapped is quarantined until a commit.
    m.set_entry(
        0,
        Entry {
            loc: Location::Slot(5),
            ..Entry::MISSING
        },
    )
    .unwrap();
    m.commit().unwrap();
    m.set_entry(0, Entry::MISSING).unwrap();
    assert_eq!((m.free_slots(), m.quarantined_slots()), (0, 1));
    m.commit().unwrap();
    assert_eq!(m.alloc_slot(), Some(5));
}
