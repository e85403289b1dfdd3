//! Crash test on a GPT loop device (issue 12): the real `streamboot` binary running
//! prepare, commit and rollback is SIGKILLed at seeded random points, at least 100 times.
//! The area lies in the free space after the partitions and the superblocks overwrite the
//! end of the backup GPT (saved first). After every kill: the device opens; a plain device
//! is the source (or, for a prepare killed right after saving the last 8 KiB, the source
//! plus that copy in free space, which the next prepare accepts); an interrupted prepare
//! resumes to the target or rolls back to the source byte for byte; an interrupted commit
//! finishes with the target home; an interrupted rollback finishes byte for byte. The seed
//! is printed; STREAMBOOT_SEED replays a run.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boot_relocator::{MetaStore, State};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use streamboot::source::{FileSource, RemoteSource};

use common::disk::{self, cli, sha256};

const MIB: usize = 1 << 20;
const DEV_LEN: usize = 48 * MIB;
const TARGET_LEN: usize = 12 * MIB + 777;
const MIN_KILLS: usize = 100;
const MAX_ROUNDS: usize = 200;
const TAIL: usize = 8192;

struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        let mut last = String::new();
        for attempt in 0..10 {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .expect("run losetup");
            if out.status.success() {
                return LoopDev(String::from_utf8_lossy(&out.stdout).trim().into());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        panic!("losetup {}: {last}", file.display());
    }
    fn p(&self) -> &str {
        self.0.to_str().unwrap()
    }
    fn read(&self) -> Vec<u8> {
        fs::read(&self.0).unwrap()
    }
    fn write(&self, img: &[u8]) {
        let f = fs::OpenOptions::new().write(true).open(&self.0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, img, 0).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The source: GPT with an ESP (1..9 MiB) and a root (9..20 MiB) full of random bytes,
/// zeros after them up to the backup GPT.
fn source_image(dir: &Path, seed: u64) -> Vec<u8> {
    let file = dir.join("src.img");
    fs::File::create(&file)
        .unwrap()
        .set_len(DEV_LEN as u64)
        .unwrap();
    let mut c = Command::new("sfdisk")
        .args(["--no-reread", "-q", file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\n\
              start=2048, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
              start=18432, size=22528, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        )
        .unwrap();
    assert!(c.wait().unwrap().success());
    let mut img = fs::read(&file).unwrap();
    fs::remove_file(&file).unwrap();
    let data = common::random_bytes(seed, 19 * MIB);
    img[MIB..20 * MIB].copy_from_slice(&data);
    img
}

fn cli_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_streamboot"));
    c.args(args);
    c
}

fn run_ok(args: &[&str]) {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` and SIGKILLs it after `delay` (if still running). True if killed.
fn run_and_kill(mut cmd: Command, delay: Duration) -> bool {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().ok();
    child.wait().unwrap();
    true
}

fn duration_of(args: &[&str]) -> Duration {
    let t = Instant::now();
    run_ok(args);
    t.elapsed()
}

fn state_of(dev: &LoopDev) -> Option<State> {
    MetaStore::probe(disk::storage(&dev.0).as_ref())
        .unwrap()
        .map(|sb| sb.state)
}

/// A plain device after a kill: the source, or the source plus a copy of its last 8 KiB
/// at `area` (a prepare killed right after saving them, or a rollback killed right after
/// writing them back). True for the latter.
fn plain_is_source(img: &[u8], source: &[u8], area: usize, what: &str) -> bool {
    if sha256(img) == sha256(source) {
        return false;
    }
    let mut want = source.to_vec();
    want[area..area + TAIL].copy_from_slice(&source[DEV_LEN - TAIL..]);
    assert!(
        sha256(img) == sha256(&want),
        "{what}: a plain device is neither the source nor the source with a saved copy"
    );
    true
}

#[test]
fn sigkill_at_random_points_on_a_gpt_loop_device() {
    let seed: u64 = std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("gpt crash test seed {seed} (STREAMBOOT_SEED={seed} to replay)");
    let mut rng: ChaCha8Rng = common::test_rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let source = source_image(dir.path(), seed);
    let mut target = common::random_bytes(seed + 1, TARGET_LEN);
    target[3 * MIB..4 * MIB].fill(0);
    let tpath = dir.path().join("target.img");
    fs::write(&tpath, &target).unwrap();
    let t = tpath.to_str().unwrap().to_string();
    let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&tpath, None).unwrap());
    let backing = dir.path().join("dev.img");
    fs::write(&backing, &source).unwrap();
    let dev = LoopDev::attach(&backing);
    let d = dev.p().to_string();
    let prepare = [
        "prepare",
        &d,
        "--target",
        &t,
        "--chunk-size",
        "64K",
        "--area-size",
        "16M",
    ];

    // Templates and uncrashed durations.
    let prep_time = duration_of(&prepare);
    let area = MetaStore::probe(disk::storage(&dev.0).as_ref())
        .unwrap()
        .unwrap()
        .layout
        .area_offset as usize;
    let prepared = dev.read();
    let commit_time = duration_of(&["commit", &d, "--force"]);
    assert!(dev.read()[..TARGET_LEN] == target[..]);
    dev.write(&prepared);
    let rollback_time = duration_of(&["rollback", &d]);
    assert!(sha256(&dev.read()) == sha256(&source), "uncrashed rollback");
    println!("uncrashed: prepare {prep_time:?} commit {commit_time:?} rollback {rollback_time:?}");
    let pick = |rng: &mut ChaCha8Rng, d: Duration| {
        Duration::from_micros(rng.random_range(0..=(d.as_micros() as u64 * 11 / 10).max(1)))
    };

    let (mut kills, mut copies, mut round) = ([0usize; 3], 0usize, 0usize);
    while kills.iter().sum::<usize>() < MIN_KILLS && round < MAX_ROUNDS {
        round += 1;
        let what = |op: &str| format!("seed {seed} round {round} {op}");
        // prepare, then resume or roll back.
        dev.write(&source);
        kills[0] += run_and_kill(cli_cmd(&prepare), pick(&mut rng, prep_time)) as usize;
        match state_of(&dev) {
            None => {
                copies += plain_is_source(&dev.read(), &source, area, &what("prepare")) as usize;
                run_ok(&prepare);
                run_ok(&["rollback", &d]);
            }
            Some(_) if rng.random_bool(0.5) => run_ok(&["rollback", &d]),
            Some(s) => {
                if s == State::Preparing {
                    run_ok(&prepare);
                }
                let e = disk::engine(&dev.0, &src);
                let mut all = vec![0u8; TARGET_LEN];
                e.read(0, &mut all).unwrap();
                drop(e);
                assert!(all == target, "{}: resumed prepare", what("prepare"));
                run_ok(&["rollback", &d]);
            }
        }
        assert!(
            sha256(&dev.read()) == sha256(&source),
            "{}: rollback after a killed prepare is not the source",
            what("prepare")
        );

        // commit from the prepared template.
        dev.write(&prepared);
        kills[1] += run_and_kill(
            cli_cmd(&["commit", &d, "--force"]),
            pick(&mut rng, commit_time),
        ) as usize;
        if state_of(&dev).is_some() {
            run_ok(&["commit", &d, "--force"]);
        }
        assert!(
            dev.read()[..TARGET_LEN] == target[..],
            "{}: commit did not give the target",
            what("commit")
        );

        // rollback from the prepared template.
        dev.write(&prepared);
        kills[2] +=
            run_and_kill(cli_cmd(&["rollback", &d]), pick(&mut rng, rollback_time)) as usize;
        if state_of(&dev).is_some() {
            run_ok(&["rollback", &d]);
        }
        copies += plain_is_source(&dev.read(), &source, area, &what("rollback")) as usize;
    }
    println!(
        "gpt crash test seed {seed}: kills prepare/commit/rollback {kills:?} in {round} rounds; \
         {copies} plain devices held a saved copy of the last 8 KiB"
    );
    assert!(kills.iter().sum::<usize>() >= MIN_KILLS, "too few kills");
}
