//! Disk helpers for integration tests: hashing, in-process prepare, running the CLI.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use boot_relocator::{relocate, FileStorage, MetaStore, PrepareSpec, Storage};
use sha2::{Digest, Sha256};
use streamboot::engine::{Engine, EngineOptions};
use streamboot::source::RemoteSource;
use streamboot::target::target_record;

/// Hex SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hex SHA-256 of a whole file.
pub fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).expect("read file to hash"))
}

/// Opens a disk file for the engine.
pub fn storage(path: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(path, true).expect("open disk"))
}

/// Prepares `disk` for `source` in-process (as `streamboot prepare` does).
pub fn prepare(
    disk: &Path,
    source: &Arc<dyn RemoteSource>,
    chunk_size: u64,
    boot: std::ops::Range<u64>,
    area_size: Option<u64>,
) -> MetaStore {
    let st = storage(disk);
    let id = source.identity().clone();
    let spec = PrepareSpec {
        chunk_size,
        target_size: id.size,
        target: target_record(source.as_ref(), &[source.name()]),
        boot_ranges: std::iter::once(boot).collect(),
        area_size,
        source_size: None,
        max_trial_starts: 3,
        area: None,
        discard_free_space: false,
    };
    let mut head = vec![0u8; (1u64 << 20).min(id.size) as usize];
    source.read_at(0, &mut head).expect("read target head");
    let plan = relocate::plan(st.as_ref(), &spec, &head).expect("plan");
    relocate::prepare(
        st,
        &spec,
        &plan,
        [7; 16],
        0,
        &mut |o, b| source.read_at(o, b).map_err(|e| e.to_string()),
        &mut |_, _, _| {},
    )
    .expect("prepare")
}

/// Opens the engine over a prepared disk.
pub fn engine(disk: &Path, source: &Arc<dyn RemoteSource>) -> Engine {
    let meta = MetaStore::open(storage(disk))
        .expect("open meta")
        .expect("prepared");
    Engine::new(meta, source.clone(), EngineOptions::default()).expect("engine")
}

/// Runs the `streamboot` binary with `args`.
pub fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(args)
        .output()
        .expect("run streamboot")
}

/// Runs the CLI and panics with its output unless it succeeded.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "streamboot {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the CLI expecting failure; returns stderr. Asserts the error is one line.
pub fn cli_err(args: &[&str]) -> String {
    let out = cli(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "streamboot {args:?} unexpectedly succeeded"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "error is not one line: {err}");
    assert!(
        lines[0].starts_with("streamboot: error: "),
        "unexpected error: {err}"
    );
    err
}
