//! `streamboot demo`: the whole migration on an embedded example, in one process.
//!
//! Builds a v1/v2 image pair ([`images`]), serves v2 from a loopback HTTP server
//! ([`http`]), prepares a copy of v1 with the library's [`migration::prepare`], serves it
//! with the daemon wiring `serve` uses ([`Daemon`]), lets a guest use it — a QEMU VM
//! ([`vm`]) when one can run here, else a `blkio` client ([`blk`]) — then confirms and
//! commits through the service and checks the final disk byte for byte.

#[cfg_attr(not(feature = "demo-blkio"), path = "blk_stub.rs")]
pub mod blk;
pub mod http;
pub mod images;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::migration::daemon::{Daemon, DaemonError, DaemonOptions};
use crate::migration::{self, PrepareOptions};
use crate::service::{Service, ServiceConfig};
use crate::source::HttpOptions;
use crate::vhost::ShutdownHandle;

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("demo HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("{name} failed (log {log}): {tail}")]
    Script {
        name: String,
        log: PathBuf,
        tail: String,
    },
    #[error("prepare")]
    Prepare(#[source] migration::MigrationError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error(transparent)]
    Vhost(#[from] crate::vhost::VhostError),
    #[error("guest: {0}")]
    Guest(String),
    #[error("{0}")]
    Failed(String),
}

impl DemoError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Work directory (disk, sockets, logs).
    pub work: PathBuf,
    /// Cache for the real images and the guest (reused across runs).
    pub cache: PathBuf,
    /// Never start a VM: drive the device with the `blkio` client.
    pub no_vm: bool,
    /// Use the synthetic image pair even when the real one could be built.
    pub synthetic: bool,
}

/// What the caller provides: progress display and step messages.
pub trait Hooks: Sync {
    /// A step begins.
    fn step(&self, msg: &str);
    /// A detail of the current step.
    fn info(&self, msg: &str);
    /// Progress of `what`: `done` of `total` (bytes).
    fn progress(&self, what: &str, done: u64, total: u64);
    /// The current progress bar is done.
    fn progress_done(&self);
}

/// The demo's result.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// "real" (bootable ext4 pair) or "synthetic".
    pub images: images::Kind,
    pub v1_size: u64,
    pub v2_size: u64,
    pub chunk_size: u64,
    /// "vm" or "blkio".
    pub guest: String,
    /// Why the guest is not a VM (when it is not).
    pub no_vm_reason: Option<String>,
    /// Guest verdict lines (VM) or the blkio client's findings.
    pub verdicts: Vec<String>,
    /// The guest saw exactly v2 (whole device compared, or the VM's manifest check).
    pub guest_verified: bool,
    /// What the HTTP server sent during prepare.
    pub wire_prepare: http::Wire,
    /// What the HTTP server sent from serve start through commit.
    pub wire_serve: http::Wire,
    pub bytes_fetched_demand: u64,
    pub bytes_fetched_background: u64,
    /// Seconds from prepare start to its end.
    pub prepare_secs: f64,
    /// Milliseconds from serve start to the guest's first read.
    pub first_read_ms: Option<f64>,
    /// Seconds from serve start to the guest's verdict (VM) or full read (blkio).
    pub guest_secs: f64,
    /// Seconds from serve start until every chunk was local (all hydrated).
    pub ready_secs: f64,
    /// Seconds the commit took.
    pub commit_secs: f64,
    /// The disk after commit equals v2 (plus the guest's write, on the blkio path).
    pub final_disk_verified: bool,
    /// Verdict of booting the committed disk plain (VM path only).
    pub plain_boot: Option<String>,
    pub total_secs: f64,
    /// Work directory (kept only when asked).
    pub work: PathBuf,
}

/// Default cache directory: `$XDG_CACHE_HOME/streamboot-demo`, `~/.cache/streamboot-demo`
/// or `/var/tmp/streamboot-demo`.
pub fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("streamboot-demo");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(".cache/streamboot-demo");
    }
    PathBuf::from("/var/tmp/streamboot-demo")
}

/// The guest's write on the blkio path: 8 KiB across a chunk boundary.
const WRITE_AT: u64 = (5 << 16) - 4096;
const WRITE_LEN: usize = 8192;
/// Background hydration limit while the guest runs, so its reads are served on demand
/// (loopback would otherwise hydrate everything before the guest asks); lifted after.
const GUEST_PHASE_RATE: u64 = 1 << 20;
/// Longest wait for hydration or commit.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(900);
/// Longest wait for a VM's verdict, and for it to power off.
const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// A vhost-user server running on its own thread.
struct Served {
    svc: Arc<Service>,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<Result<(), DemoError>>>,
    events: std::sync::mpsc::Receiver<String>,
}

impl Served {
    fn start(disk: &Path, sock: &Path, allow_unsealed_memory: bool) -> Result<Self, DemoError> {
        let service = ServiceConfig {
            disk: disk.to_path_buf(),
            read_only: false,
            max_trial_starts: None,
            targets: Vec::new(),
            http: HttpOptions::default(),
            hydrate: true,
            hydrate_rate: GUEST_PHASE_RATE,
            record_profile: None,
            boot_profile: None,
        };
        let daemon = Daemon::start(DaemonOptions {
            allow_unsealed_memory,
            ..DaemonOptions::new(service, sock.to_path_buf())
        })?;
        let svc = daemon.service().clone();
        let (tx, events) = std::sync::mpsc::channel();
        let tx = parking_lot::Mutex::new(tx);
        svc.on_event(move |ev, _| {
            let _ = tx.lock().send(ev.to_string());
        });
        let shutdown = daemon.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("demo-vhost".into())
            .spawn(move || daemon.run().map(|_| ()).map_err(DemoError::from))
            .map_err(|e| DemoError::io(sock, e))?;
        Ok(Self {
            svc,
            shutdown,
            thread: Some(thread),
            events,
        })
    }

    /// Stops the server and the service; everything durable.
    fn stop(mut self) -> Result<(), DemoError> {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| DemoError::Failed("vhost server thread panicked".into()))??;
        }
        Ok(())
    }

    fn fetched(&self) -> (u64, u64) {
        match self.svc.engine() {
            Some(e) => (
                e.counters().fetched_demand.load(Relaxed),
                e.counters().fetched_background.load(Relaxed),
            ),
            None => (0, 0),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the demo. The work directory is created if needed; the caller removes it.
pub fn run(opts: &DemoOptions, hooks: &dyn Hooks) -> Result<Summary, DemoError> {
    let t_all = Instant::now();
    if opts.work.exists() && !opts.work.is_dir() {
        return Err(DemoError::Failed(format!(
            "work directory {} exists and is not a directory",
            opts.work.display()
        )));
    }
    std::fs::create_dir_all(&opts.work).map_err(|e| DemoError::io(&opts.work, e))?;

    // 1. Images, and the guest.
    let mut no_vm_reason = if opts.no_vm {
        Some("--no-vm".to_string())
    } else {
        vm::unavailable()
    };
    let missing = images::missing_image_tools();
    hooks.step("1. image pair v1 (the VM's disk now) and v2 (the target)");
    let pair = if opts.synthetic || !missing.is_empty() {
        if !opts.synthetic {
            hooks.info(&format!(
                "{} missing: building a synthetic pair (not bootable)",
                missing.join(", ")
            ));
        }
        no_vm_reason.get_or_insert_with(|| "synthetic images do not boot".into());
        images::synthetic()
    } else {
        hooks.info(&format!(
            "building v1/v2 with the embedded vm-tests/build-images.sh (cached in {})",
            opts.cache.display()
        ));
        images::real(&opts.cache)?
    };
    let guest = match no_vm_reason {
        None => {
            hooks.info("building the guest kernel + initramfs (embedded vm-tests/build-guest.sh)");
            Some(vm::build_guest(&opts.cache)?)
        }
        Some(_) => None,
    };
    let kind = pair.kind;
    let (v1_size, v2_size) = (pair.v1.len() as u64, pair.v2.len() as u64);
    hooks.info(&format!(
        "{} pair: v1 {v1_size} bytes, v2 {v2_size} bytes",
        kind.name()
    ));
    let disk = opts.work.join("disk.img");
    std::fs::write(&disk, &pair.v1).map_err(|e| DemoError::io(&disk, e))?;
    drop(pair.v1);
    let v2 = Bytes::from(pair.v2);

    // 2. HTTP server.
    let server = http::ImageServer::start(v2.clone())?;
    let url = server.url("v2.img");
    hooks.step(&format!("2. built-in HTTP server serves v2 at {url}"));

    // 3. prepare.
    hooks.step("3. prepare: relocate v2's boot chunks onto the disk (reversible)");
    let t0 = Instant::now();
    let prepared = migration::prepare(
        &PrepareOptions::new(disk.clone(), vec![url.clone()]),
        &HookProgress(hooks),
    )
    .map_err(DemoError::Prepare)?;
    hooks.info(&format!(
        "{} boot chunks home, state {}",
        prepared.status.chunks_home, prepared.status.state
    ));
    let prepare_secs = t0.elapsed().as_secs_f64();
    let wire_prepare = server.wire();
    hooks.info(&format!(
        "took {prepare_secs:.2} s, {} bytes over HTTP",
        wire_prepare.bytes
    ));

    // 4. serve, and a guest uses the disk.
    let sock = opts.work.join("vhost.sock");
    let serve_start = Instant::now();
    // QEMU's memfd memory is sealed; libblkio's buffers are not.
    let served = Served::start(&disk, &sock, guest.is_none())?;
    hooks.info(&format!(
        "serving {} on {} (background hydration limited to {} bytes/s while the guest runs)",
        disk.display(),
        sock.display(),
        GUEST_PHASE_RATE
    ));
    let chunk_size = served.svc.status().chunk_size;
    let mut expected = v2.to_vec();
    let mut verdicts = Vec::new();
    let guest_verified;
    let guest_secs;
    match &guest {
        Some(g) => {
            hooks.step("4. serve; a VM boots v2 through vhost-user-blk while it streams (TCG)");
            let mut vm = vm::Vm::start(
                g,
                vm::Disk::Vhost(&sock),
                "sbtest.readall=1 ro",
                &opts.work.join("boot-v2.log"),
            )?;
            let v = vm.wait_line("STREAMBOOT-VERDICT", VM_TIMEOUT);
            guest_secs = serve_start.elapsed().as_secs_f64();
            let v = v.ok_or_else(|| {
                DemoError::Guest(format!(
                    "no verdict from the VM (console log {})",
                    vm.log.display()
                ))
            })?;
            hooks.info(&format!("guest: {v} after {guest_secs:.1} s"));
            verdicts.push(v.clone());
            if v != "STREAMBOOT-VERDICT v2 files-ok" {
                return Err(DemoError::Guest(format!("unexpected verdict: {v}")));
            }
            hooks.step("5. confirm through the service while the VM still runs");
            hooks.info(&served.svc.confirm()?);
            let log = vm.log.clone();
            let clean = vm.wait(VM_TIMEOUT)?;
            let lines = vm::console_lines(&log);
            let readall = lines.iter().find(|l| l.contains("readall-")).cloned();
            if let Some(r) = &readall {
                hooks.info(&format!("guest: {r}"));
                verdicts.push(r.clone());
            }
            guest_verified = clean && readall.as_deref().is_some_and(|r| r.contains("readall-ok"));
            if !guest_verified {
                return Err(DemoError::Guest(format!(
                    "the VM did not finish cleanly (console log {})",
                    log.display()
                )));
            }
        }
        None => {
            hooks.step(&format!(
                "4. serve; a blkio client reads the whole device while it streams (no VM: {})",
                no_vm_reason.as_deref().unwrap_or("")
            ));
            let mut c = blk::Client::connect(&sock)?;
            let total = c.capacity;
            let bad = c.verify(&v2, &|d| hooks.progress("guest reads the device", d, total))?;
            hooks.progress_done();
            guest_secs = serve_start.elapsed().as_secs_f64();
            if let Some(off) = bad {
                return Err(DemoError::Guest(format!(
                    "the device differs from v2 at byte {off}"
                )));
            }
            verdicts.push(format!("read {total} bytes: equal to v2"));
            hooks.info(&format!(
                "all {total} bytes equal to v2 ({guest_secs:.2} s)"
            ));
            hooks.step("5. confirm through the service; the guest writes and flushes");
            hooks.info(&served.svc.confirm()?);
            let data: Vec<u8> = (0..WRITE_LEN).map(|i| (i % 251) as u8 ^ 0x5a).collect();
            c.write(WRITE_AT, &data)?;
            c.flush()?;
            let mut back = vec![0u8; WRITE_LEN];
            c.read(WRITE_AT, &mut back)?;
            if back != data {
                return Err(DemoError::Guest(
                    "the written bytes did not read back".into(),
                ));
            }
            expected[WRITE_AT as usize..WRITE_AT as usize + WRITE_LEN].copy_from_slice(&data);
            verdicts.push(format!(
                "wrote {WRITE_LEN} bytes at {WRITE_AT}, flushed, read back equal"
            ));
            hooks.info(verdicts.last().map(String::as_str).unwrap_or(""));
            guest_verified = true;
        }
    }

    // 6. background hydration finishes: every chunk local.
    hooks.step("6. background hydration, now unlimited: every chunk local");
    if let Some(h) = served.svc.hydrator() {
        h.rate.set(0);
    }
    let ready_secs = wait_until(BACKGROUND_TIMEOUT, || {
        let s = served.svc.status();
        let local = s.chunks_total - s.chunks_missing;
        hooks.progress("hydrating (chunks)", local, s.chunks_total);
        if let Some(e) = served.svc.last_error() {
            return Err(DemoError::Failed(e));
        }
        Ok(s.chunks_missing == 0)
    })
    .map(|()| serve_start.elapsed().as_secs_f64())?;
    hooks.progress_done();
    let (demand, background) = served.fetched();
    hooks.info(&format!(
        "ready after {ready_secs:.2} s: {demand} bytes fetched on demand, {background} in the background"
    ));

    // 7. commit.
    hooks.step("7. commit: every chunk home, released area removed");
    let t0 = Instant::now();
    hooks.info(&served.svc.commit()?);
    let mut outcome = None;
    wait_until(BACKGROUND_TIMEOUT, || {
        let s = served.svc.status();
        hooks.progress("committing (chunks home)", s.chunks_home, s.chunks_total);
        while let Ok(ev) = served.events.try_recv() {
            if ev == "commit-done" || ev == "commit-failed" {
                outcome = Some(ev);
            }
        }
        Ok(outcome.is_some())
    })?;
    hooks.progress_done();
    let commit_secs = t0.elapsed().as_secs_f64();
    if outcome.as_deref() != Some("commit-done") {
        return Err(DemoError::Failed(
            served
                .svc
                .last_error()
                .unwrap_or_else(|| "commit failed".into()),
        ));
    }
    let first_read_ms = served.svc.status().first_read_ms;
    let (demand, background) = served.fetched();
    let wire_serve = server.wire().since(wire_prepare);
    served.stop()?;
    drop(server);
    hooks.info(&format!("committed in {commit_secs:.2} s"));

    // 8. the disk is v2.
    hooks.step("8. the disk now holds v2, byte for byte");
    let got = std::fs::read(&disk).map_err(|e| DemoError::io(&disk, e))?;
    let final_disk_verified = got == expected;
    if !final_disk_verified {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(expected.len()));
        return Err(DemoError::Failed(format!(
            "the committed disk differs from the expected bytes at {at} ({} vs {} bytes)",
            got.len(),
            expected.len()
        )));
    }
    hooks.info(&format!(
        "{} bytes equal to v2{}",
        got.len(),
        if guest.is_some() {
            ""
        } else {
            " plus the guest's write"
        }
    ));

    // 9. the committed disk boots plain.
    let plain_boot = match &guest {
        Some(g) => {
            hooks.step("9. the committed disk boots plain (QEMU virtio-blk, no streamboot)");
            let mut vm = vm::Vm::start(
                g,
                vm::Disk::Plain(&disk),
                "ro",
                &opts.work.join("boot-plain.log"),
            )?;
            let v = vm.wait_line("STREAMBOOT-VERDICT", VM_TIMEOUT);
            vm.wait(VM_TIMEOUT)?;
            let v = v.unwrap_or_else(|| "no verdict".into());
            hooks.info(&format!("guest: {v}"));
            if v != "STREAMBOOT-VERDICT v2 files-ok" {
                return Err(DemoError::Guest(format!("plain boot: {v}")));
            }
            Some(v)
        }
        None => None,
    };

    Ok(Summary {
        images: kind,
        v1_size,
        v2_size,
        chunk_size,
        guest: if guest.is_some() { "vm" } else { "blkio" }.into(),
        no_vm_reason,
        verdicts,
        guest_verified,
        wire_prepare,
        wire_serve,
        bytes_fetched_demand: demand,
        bytes_fetched_background: background,
        prepare_secs,
        first_read_ms,
        guest_secs,
        ready_secs,
        commit_secs,
        final_disk_verified,
        plain_boot,
        total_secs: t_all.elapsed().as_secs_f64(),
        work: opts.work.clone(),
    })
}

/// The library's progress reports shown through the caller's hooks.
struct HookProgress<'a>(&'a dyn Hooks);

impl migration::Progress for HookProgress<'_> {
    fn update(&self, step: &str, done: u64, total: u64) {
        self.0.progress(step, done, total);
    }

    fn finish(&self) {
        self.0.progress_done();
    }
}

/// Polls `done` every 50 ms until it says true, fails, or `timeout` passes.
fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, DemoError>,
) -> Result<(), DemoError> {
    let end = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(DemoError::Failed(format!(
                "timed out after {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
