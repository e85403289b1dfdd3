//! Metadata the guest cannot forge, and metadata that is never acted on unless current
//! (issue 11): real `streamboot` binary, real files, real nginx, real engine.
//!
//! - a superblock the host key does not verify (forged by a guest in the last 8 KiB of a
//!   plain-served disk) is guest data: the disk is plain, nothing is fetched, offline
//!   commands refuse and the disk stays byte-identical;
//! - `--source-size` smaller than a regular file is refused before anything is written;
//! - a damaged superblock copy or map page never makes streamboot act on an older state;
//! - the magic-less superblock bodies of a prepare killed in its first write are
//!   recognised and the file is truncated back to the source.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use boot_relocator::format::{encode_page, BLOCK};
use boot_relocator::{
    Entry, FileStorage, HostKey, Layout, MetaStore, PreparePhase, State, Storage, Superblock,
    TargetRecord,
};
use common::blkio_client::Client;
use common::disk::{cli_err, cli_ok, sha256, sha256_file};
use common::nginx::Nginx;
use common::random_bytes;
use common::serve::Served;
use streamboot::source::{FileSource, RemoteSource};
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// Runs `args`, which must fail with a one-line error containing `phrase`, leaving
/// `disk` byte-identical.
fn refuses(disk: &Path, args: &[&str], phrase: &str) {
    let before = sha256_file(disk);
    let err = cli_err(args);
    assert!(
        err.contains(phrase),
        "{args:?}: expected {phrase:?} in: {err}"
    );
    assert_eq!(sha256_file(disk), before, "{args:?} changed the disk");
}

/// A superblock that claims the last 8 KiB of a plain `disk_len`-byte disk, pointing at
/// `url`: what a guest can write there.
fn forged(disk_len: u64, url: &str) -> Superblock {
    let c = 64 << 10;
    let slot_offset = 2 * MIB as u64 + c;
    Superblock {
        generation: 99,
        uuid: [0x66; 16],
        state: State::Confirmed,
        phase: PreparePhase::MapReady,
        start_counter: 0,
        max_trial_starts: 3,
        layout: Layout {
            chunk_shift: 16,
            disk_len,
            source_size: 2 * MIB as u64,
            target_size: 2 * MIB as u64,
            area_offset: 2 * MIB as u64,
            map_offset: 2 * MIB as u64,
            map_pages: 1,
            slot_offset,
            slot_count: (disk_len - 2 * BLOCK as u64 - slot_offset) / c,
        },
        target: TargetRecord {
            kind: "http".into(),
            validator: "\"forged\"".into(),
            urls: vec![url.to_string()],
        },
        created_unix: 0,
        seeded_bytes: 0,
        release: Default::default(),
    }
}

/// Reads the whole device a serve presents.
fn read_device(socket: &Path) -> Vec<u8> {
    let mut c = Client::connect(socket, 1, MIB).expect("connect");
    let cap = c.capacity as usize;
    let mut out = vec![0u8; cap];
    for off in (0..cap).step_by(MIB) {
        let n = MIB.min(cap - off);
        assert_eq!(c.read(off as u64, 0, n), 0, "read at {off}");
        out[off..off + n].copy_from_slice(c.buf(0..n));
    }
    out
}

#[test]
fn forged_superblock_on_a_plain_disk_is_guest_data() {
    let nginx = Nginx::start();
    nginx.put("evil.img", &random_bytes(1, 2 * MIB));
    let url = nginx.url("evil.img");
    let dir = TempDir::new().unwrap();
    let disk = dir.path().join("disk.img");
    let len = 8 * MIB as u64;
    let other_host = HostKey::from_bytes([0x42; 32]);
    let sb = forged(len, &url);
    // Format v1 (what today's format looks like) and a v2 block under another key.
    for (name, block) in [
        ("v1", sb.encode_legacy_v1()),
        ("v2 other key", sb.encode(&other_host)),
    ] {
        let mut img = random_bytes(2, len as usize);
        for k in 0..2u8 {
            let at = Layout::sb_addr(len, k) as usize;
            img[at..at + BLOCK].copy_from_slice(&block);
            // A whole forgery: valid map pages too (all chunks missing: fetch them).
            let page = encode_page(0, 1, &sb.uuid, &[Entry::MISSING; 32]);
            let at = sb.layout.page_addr(0, k) as usize;
            img[at..at + BLOCK].copy_from_slice(&page);
        }
        fs::write(&disk, &img).unwrap();
        let d = disk.to_str().unwrap();
        let status = cli_ok(&["status", d]);
        assert!(status.contains("plain disk"), "{name}: {status}");
        let st = FileStorage::open(&disk, false).unwrap();
        let ignored = MetaStore::unverified_superblocks(&st).unwrap();
        assert_eq!(ignored.len(), 2, "{name}: {ignored:?}");
        drop(st);
        for op in [
            &["rollback", d][..],
            &["commit", "--force", d],
            &["confirm", d],
        ] {
            refuses(&disk, op, "not a prepared disk");
        }
        let socket = dir.path().join("vhost.sock");
        let _ = fs::remove_file(&socket);
        let served = Served::start(&disk, &socket, &[]);
        assert_eq!(read_device(&socket), img, "{name}: not served plain");
        drop(served);
        assert_eq!(fs::read(&disk).unwrap(), img, "{name}: disk changed");
        assert!(
            nginx.access_log().is_empty(),
            "{name}: streamboot fetched the guest's URL: {:?}",
            nginx.access_log()
        );
    }
}

#[test]
fn source_size_smaller_than_the_disk_file_is_refused() {
    let dir = TempDir::new().unwrap();
    let target = dir.path().join("target.img");
    fs::write(&target, random_bytes(3, 3 * MIB)).unwrap();
    let disk = dir.path().join("disk.img");
    fs::write(&disk, random_bytes(4, 8 * MIB)).unwrap();
    let (d, t) = (disk.to_str().unwrap(), target.to_str().unwrap());
    refuses(
        &disk,
        &["prepare", d, "--target", t, "--source-size", "2M"],
        "smaller than the disk file",
    );
    assert_eq!(fs::metadata(&disk).unwrap().len(), 8 * MIB as u64);
    assert!(cli_ok(&["status", d]).contains("plain disk"));
}

/// A disk file with a source and a file target next to it.
struct Fx {
    dir: TempDir,
    disk: PathBuf,
    source: Vec<u8>,
    target: Vec<u8>,
}

impl Fx {
    fn new(seed: u64) -> Fx {
        let dir = TempDir::new().unwrap();
        let source = random_bytes(seed, 3 * MIB + 4096);
        let target = random_bytes(seed + 1, 4 * MIB + 1000);
        fs::write(dir.path().join("target.img"), &target).unwrap();
        let disk = dir.path().join("disk.img");
        fs::write(&disk, &source).unwrap();
        Fx {
            dir,
            disk,
            source,
            target,
        }
    }
    fn d(&self) -> &str {
        self.disk.to_str().unwrap()
    }
    fn target_path(&self) -> PathBuf {
        self.dir.path().join("target.img")
    }
    fn prepare(&self) {
        let t = self.target_path();
        cli_ok(&[
            "prepare",
            self.d(),
            "--target",
            t.to_str().unwrap(),
            "--chunk-size",
            "64K",
        ]);
    }
    fn meta(&self) -> MetaStore {
        let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&self.disk, true).unwrap());
        MetaStore::open(st).unwrap().expect("prepared")
    }
}

/// Generation of superblock copy `k` of `img`, when it verifies.
fn sb_generation(img: &[u8], k: u8) -> Option<u64> {
    let key = HostKey::load().unwrap()?;
    let at = Layout::sb_addr(img.len() as u64, k) as usize;
    Superblock::decode(&img[at..at + BLOCK], Some(&key))
        .ok()
        .map(|s| s.generation)
}

#[test]
fn damaged_newest_superblock_copy_never_rolls_back_a_started_commit() {
    let fx = Fx::new(10);
    fx.prepare();
    cli_ok(&["confirm", fx.d()]);
    // A commit killed after moving chunk 40 home (the source's bytes there are gone).
    {
        let mut meta = fx.meta();
        meta.set_state(State::Committing).unwrap();
        let c = 64 << 10;
        meta.storage()
            .write_at(40 * c as u64, &fx.target[40 * c..41 * c])
            .unwrap();
        meta.storage().sync().unwrap();
    }
    let mut img = fs::read(&fx.disk).unwrap();
    let newest = match (sb_generation(&img, 0), sb_generation(&img, 1)) {
        (Some(a), Some(b)) if a > b => 0,
        _ => 1,
    };
    let intact = img.clone();
    let at = Layout::sb_addr(img.len() as u64, newest) as usize;
    img[at + 2000] ^= 1;
    fs::write(&fx.disk, &img).unwrap();
    let err = cli_err(&["rollback", fx.d()]);
    assert!(
        err.contains("cannot roll back in state committing"),
        "{err}"
    );
    // Nothing moved; the damaged copy was rewritten from the intact one, which was
    // current (both copies hold every completed update).
    assert!(
        fs::read(&fx.disk).unwrap() == intact,
        "rollback changed the disk"
    );
    assert!(cli_ok(&["status", fx.d()]).contains("state:        committing"));
    // Commit resumes from the intact copy and ends with the target.
    cli_ok(&["commit", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.target));
}

#[test]
fn damaged_map_page_copy_never_loses_a_flushed_write() {
    let fx = Fx::new(20);
    fx.prepare();
    let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&fx.target_path(), None).unwrap());
    // Chunk 30 (outside the boot set): a guest write, flushed.
    let data = vec![0xabu8; 64 << 10];
    let off = 30 * (64 << 10) as u64;
    {
        let e = common::disk::engine(&fx.disk, &src);
        e.write(off, &data).unwrap();
        e.flush().unwrap();
    }
    let mut img = fs::read(&fx.disk).unwrap();
    let l = *fx.meta().layout();
    let gen = |k: u8| {
        let at = l.page_addr(0, k) as usize;
        u64::from_le_bytes(img[at + 8..at + 16].try_into().unwrap())
    };
    let newest = if gen(0) > gen(1) { 0 } else { 1 };
    // Byte 64 + 30 * 16: chunk 30's entry.
    img[l.page_addr(0, newest) as usize + 64 + 30 * 16] ^= 1;
    fs::write(&fx.disk, &img).unwrap();
    let e = common::disk::engine(&fx.disk, &src);
    let mut back = vec![0u8; data.len()];
    e.read(off, &mut back).unwrap();
    assert!(back == data, "the flushed write disappeared");
    drop(e);
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}

/// The bytes a prepare killed between its superblock body and magic writes leaves.
fn killed_in_first_write(fx: &Fx) {
    {
        let meta = {
            let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&fx.disk, true).unwrap());
            let spec = boot_relocator::PrepareSpec {
                chunk_size: 64 << 10,
                target_size: fx.target.len() as u64,
                target: TargetRecord {
                    kind: "file".into(),
                    validator: "x".into(),
                    urls: vec![],
                },
                boot_ranges: std::iter::once(0..MIB as u64).collect(),
                area_size: None,
                source_size: None,
                max_trial_starts: 3,
                area: None,
                discard_free_space: false,
            };
            let plan = boot_relocator::plan(st.as_ref(), &spec, &fx.target[..MIB]).unwrap();
            let sb = Superblock {
                generation: 1,
                uuid: [1; 16],
                state: State::Preparing,
                phase: PreparePhase::Reserved,
                start_counter: 0,
                max_trial_starts: 3,
                layout: plan.layout,
                target: spec.target,
                created_unix: 0,
                seeded_bytes: 0,
                release: Default::default(),
            };
            MetaStore::create(st, sb, &plan.boot_chunks).unwrap()
        };
        let len = meta.layout().disk_len;
        for k in 0..2 {
            meta.storage()
                .write_at(Layout::sb_addr(len, k), &[0; 8])
                .unwrap();
        }
    }
    assert!(fs::metadata(&fx.disk).unwrap().len() > fx.source.len() as u64);
}

#[test]
fn prepare_killed_in_its_first_write_gets_the_source_size_back() {
    let fx = Fx::new(30);
    killed_in_first_write(&fx);
    fx.prepare();
    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&["--json", "status", fx.d()])).unwrap();
    assert_eq!(
        st["status"]["source_size"].as_u64(),
        Some(fx.source.len() as u64),
        "{st}"
    );
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));

    let fx = Fx::new(31);
    killed_in_first_write(&fx);
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}

/// A disk prepared before format v2 reads as plain until it is adopted explicitly; then
/// it is a prepared disk again, and rollback gives the source back.
#[test]
fn format_v1_disk_is_plain_until_adopted() {
    let fx = Fx::new(40);
    fx.prepare();
    cli_ok(&["confirm", fx.d()]);
    let mut img = fs::read(&fx.disk).unwrap();
    let key = HostKey::load().unwrap().unwrap();
    for k in 0..2u8 {
        let at = Layout::sb_addr(img.len() as u64, k) as usize;
        let sb = Superblock::decode(&img[at..at + BLOCK], Some(&key)).unwrap();
        img[at..at + BLOCK].copy_from_slice(&sb.encode_legacy_v1());
    }
    fs::write(&fx.disk, &img).unwrap();
    let st = cli_ok(&["status", fx.d()]);
    assert!(st.contains("plain disk"), "{st}");
    assert!(
        st.contains("ignored") && st.contains("adopt"),
        "no hint: {st}"
    );
    refuses(&fx.disk, &["rollback", fx.d()], "not a prepared disk");
    let out = cli_ok(&["adopt", fx.d()]);
    assert!(
        out.contains("adopted") && out.contains("confirmed"),
        "{out}"
    );
    let again = cli_err(&["adopt", fx.d()]);
    assert_eq!(again.lines().count(), 1, "{again}");
    assert!(cli_ok(&["status", fx.d()]).contains("state:        confirmed"));
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}

/// Runs the binary with `STREAMBOOT_HOST_KEY` set; returns (success, stdout + stderr).
fn cli_with_key(key: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(args)
        .env("STREAMBOOT_HOST_KEY", key)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `STREAMBOOT_HOST_KEY` names the key: the first prepare creates it (0600); a host with
/// another key sees the disk as plain (moving a disk needs its key); with the key, the
/// disk is prepared again and rolls back.
#[test]
fn host_key_from_the_environment_and_disks_moved_between_hosts() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fx::new(50);
    let key = fx.dir.path().join("keys/host.key");
    let t = fx.target_path();
    let (ok, out) = cli_with_key(&key, &["prepare", fx.d(), "--target", t.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, out) = cli_with_key(&key, &["status", fx.d()]);
    assert!(ok && out.contains("state:        prepared"), "{out}");
    // Another host (another key): guest data as far as it can tell.
    let other = fx.dir.path().join("other.key");
    let before = sha256_file(&fx.disk);
    let (ok, out) = cli_with_key(&other, &["status", fx.d()]);
    assert!(ok && out.contains("plain disk"), "{out}");
    let (ok, out) = cli_with_key(&other, &["rollback", fx.d()]);
    assert!(!ok && out.contains("not a prepared disk"), "{out}");
    assert_eq!(sha256_file(&fx.disk), before);
    // A key file others can read is refused, naming it.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = cli_with_key(&key, &["status", fx.d()]);
    assert!(
        !ok && out.contains("host key") && out.contains("chmod 600"),
        "{out}"
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, out) = cli_with_key(&key, &["rollback", fx.d()]);
    assert!(ok, "{out}");
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}
