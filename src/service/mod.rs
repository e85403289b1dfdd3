//! What `streamboot serve` runs behind the vhost-user socket: decides at start whether
//! the disk presents the target (engine) or a plain image (after commit, rollback or
//! fallback), runs the trial-boot state machine, background hydration, commit and
//! rollback. Independent of the transports (vhost-user, control API) that drive it.
//!
//! Trial boots are counted per *device start* (see [`DeviceEvents`]): a fresh start of the
//! guest's driver (a new VM, or a reboot inside the same VMM process) while the target is
//! in trial is one start. A fresh start finding the counter at the limit without a confirm
//! falls back: rollback, and that very start sees the source. A start of the same running
//! guest after a backend restart (resumed rings), a disconnect or a `serve` (re)start never
//! counts and never falls back: the contents never switch under a running guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use boot_relocator::{relocate, FileStorage, MetaStore, State, Storage};
use parking_lot::Mutex;

use crate::blockdev::{BlockBackend, BlockError};
use crate::engine::{Engine, EngineError, EngineOptions, HydrateOptions, Hydrator, Status};
use crate::migration::transitions::{transition, Next, Op};
use crate::plain::PlainDisk;
use crate::source::HttpOptions;
use crate::target::{open_source, pinned_identity};

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request conflicts with the current state (wrong state, VM connected, busy).
    #[error("{0}")]
    Conflict(String),
    /// A regular file that an interrupted prepare extended (its growth record verifies):
    /// serving it would hand the extension to a guest, whose writes there the next
    /// prepare or rollback would cut away.
    #[error(
        "{} was extended by an interrupted prepare (its source is {source_size} bytes): \
         run `streamboot rollback` on it (or prepare again) before serving it",
        path.display()
    )]
    InterruptedPrepare {
        /// The disk.
        path: PathBuf,
        /// Its length before the prepare.
        source_size: u64,
    },
    /// Another process holds the disk's exclusive lock.
    #[error("{} is in use by another streamboot process (a running serve?); use its control socket", path.display())]
    InUse {
        /// The disk.
        path: PathBuf,
    },
    /// Disk, metadata or engine failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Metadata failure.
    #[error(transparent)]
    Reloc(#[from] boot_relocator::RelocError),
    /// Opening the target failed.
    #[error("opening the target: {0}")]
    Source(#[from] crate::source::SourceError),
    /// I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Block device failure.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The boot profile does not fit the target.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// The lifecycle's transition table refuses the operation in this state.
    #[error(transparent)]
    Transition(#[from] crate::migration::Conflict),
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The disk.
    pub disk: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// Trial starts before fallback (None: as recorded by prepare).
    pub max_trial_starts: Option<u8>,
    /// Fetch from these URLs instead of the recorded ones (same pinned image).
    pub targets: Vec<String>,
    /// HTTP options for the source.
    pub http: HttpOptions,
    /// Hydrate in the background.
    pub hydrate: bool,
    /// Hydration rate limit in bytes per second (0 = unlimited).
    pub hydrate_rate: u64,
    /// Record the guest's reads as a boot profile to this file (saved at confirm, or
    /// at shutdown when no confirm came).
    pub record_profile: Option<PathBuf>,
    /// Hydrate this profile's chunks first, in its order.
    pub boot_profile: Option<crate::profile::BootProfile>,
}

/// What the disk presents (the control API's type).
pub use crate::control::ServeMode as Mode;

mod control_ops;
mod events;
mod switch;

use switch::FailedDisk;
pub use switch::SwitchDisk;

/// How long stopping hydration waits for a fetch in flight.
const HYDRATOR_STOP_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// A listener for `(event, message)` state events.
type EventListener = Box<dyn Fn(&str, &str) + Send + Sync>;

struct Background {
    hydrator: Option<(Arc<Hydrator>, JoinHandle<()>)>,
    commit: Option<JoinHandle<()>>,
}

/// The running service.
pub struct Service {
    cfg: ServiceConfig,
    storage: Arc<dyn Storage>,
    disk: Arc<SwitchDisk>,
    engine: Mutex<Option<Arc<Engine>>>,
    mode: Mutex<Mode>,
    max_trial: u8,
    bg: Mutex<Background>,
    last_error: Arc<Mutex<Option<String>>>,
    /// True from a frontend's connection until every request it issued is done.
    connected: std::sync::atomic::AtomicBool,
    /// Set by `shutdown`: background work ending now is paused, not failed.
    stopping: std::sync::atomic::AtomicBool,
    /// Serializes every state transition (confirm, commit start, rollback, fallback, trial
    /// starts): each re-checks the state under it, so no transition acts on a stale view.
    ops: Mutex<()>,
    /// A weak handle to ourselves, for operations that spawn threads holding the service.
    me: Mutex<std::sync::Weak<Service>>,
    events: Mutex<Vec<EventListener>>,
    /// Boot profile recorder (`record_profile`), while the target is served.
    recorder: Option<Arc<crate::profile::Recorder>>,
    /// Engine chunks the hydrator fetches first (`boot_profile`).
    profile_chunks: Vec<u64>,
}

fn plain(
    storage: &Arc<dyn Storage>,
    read_only: bool,
    capacity: u64,
) -> Result<Arc<dyn BlockBackend>, ServiceError> {
    Ok(Arc::new(
        PlainDisk::new(storage.clone(), read_only)?.with_capacity(capacity),
    ))
}

/// Opens the disk for serving (or an offline command) and takes its exclusive lock.
pub fn open_locked(path: &Path, writable: bool) -> Result<Arc<dyn Storage>, ServiceError> {
    let st = FileStorage::open(path, writable)?;
    if !st.try_lock()? {
        return Err(ServiceError::InUse {
            path: path.to_owned(),
        });
    }
    Ok(Arc::new(st))
}

/// Opens the disk for `serve`. Even with `read_only` (the guest's view) a prepared disk
/// is opened writable: fetched chunks are cached and trial starts recorded on it. A plain
/// disk the caller may only read is served read-only.
fn open_for_serving(path: &Path, read_only: bool) -> Result<Arc<dyn Storage>, ServiceError> {
    match open_locked(path, true) {
        Err(ServiceError::Reloc(e)) if read_only && is_permission_error(&e) => {
            let st = open_locked(path, false)?;
            if MetaStore::open(st.clone())?.is_some() {
                return Err(ServiceError::Conflict(format!(
                    "{} is prepared: serving it needs write access even with --read-only \
                     (fetched chunks and trial starts are recorded on the disk)",
                    path.display()
                )));
            }
            Ok(st)
        }
        other => other,
    }
}

fn is_permission_error(e: &boot_relocator::RelocError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            );
        }
        cur = err.source();
    }
    false
}

impl Service {
    /// Opens the disk and decides what to serve: see the module documentation.
    pub fn start(cfg: ServiceConfig) -> Result<Arc<Self>, ServiceError> {
        let storage = open_for_serving(&cfg.disk, cfg.read_only)?;
        let mut recorder = None;
        let mut profile_chunks = Vec::new();
        let (mode, engine, max_trial) = match MetaStore::open(storage.clone())? {
            None => {
                if let Some(g) = boot_relocator::growth::interrupted_growth(&storage)? {
                    return Err(ServiceError::InterruptedPrepare {
                        path: cfg.disk.clone(),
                        source_size: g.source_size,
                    });
                }
                (Mode::Plain, None, 0)
            }
            Some(mut meta) => {
                let sb = meta.superblock().clone();
                let max = cfg.max_trial_starts.unwrap_or(sb.max_trial_starts).max(1);
                // Preparing: refused (resume prepare or roll back first).
                transition(sb.state, Op::Serve)?;
                match sb.state {
                    State::Committed => {
                        relocate::remove_area(&mut meta)?;
                        (Mode::Plain, None, max)
                    }
                    State::RollingBack | State::RolledBack => {
                        relocate::rollback(&mut meta, &mut |_, _, _| {})?;
                        (Mode::Source, None, max)
                    }
                    _ => {
                        let urls = if cfg.targets.is_empty() {
                            sb.target.urls.clone()
                        } else {
                            cfg.targets.clone()
                        };
                        let src = open_source(&urls, Some(&pinned_identity(&sb)), &cfg.http)?;
                        let mut e = Engine::new(meta, src, EngineOptions::default())?;
                        e.set_read_only(cfg.read_only);
                        let (cs, size) = (sb.layout.chunk_size(), sb.layout.target_size);
                        if let Some(p) = &cfg.boot_profile {
                            p.check_image(size)?;
                            profile_chunks = p.chunks_at(cs);
                        }
                        if let Some(path) = &cfg.record_profile {
                            let r = Arc::new(crate::profile::Recorder::new(
                                path.clone(),
                                cs,
                                size,
                                sb.target.validator.clone(),
                            ));
                            e.set_recorder(r.clone());
                            recorder = Some(r);
                        }
                        (Mode::Target, Some(Arc::new(e)), max)
                    }
                }
            }
        };
        let backend: Arc<dyn BlockBackend> = match &engine {
            Some(e) => e.clone(),
            None => {
                let len = storage.len()?;
                plain(&storage, cfg.read_only, len)?
            }
        };
        let svc = Arc::new(Self {
            disk: Arc::new(SwitchDisk::new(backend)),
            storage,
            engine: Mutex::new(engine),
            mode: Mutex::new(mode),
            max_trial,
            bg: Mutex::new(Background {
                hydrator: None,
                commit: None,
            }),
            last_error: Arc::new(Mutex::new(None)),
            connected: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            ops: Mutex::new(()),
            me: Mutex::new(std::sync::Weak::new()),
            events: Mutex::new(Vec::new()),
            recorder,
            profile_chunks,
            cfg,
        });
        *svc.me.lock() = Arc::downgrade(&svc);
        if mode == Mode::Target {
            let committing = svc.engine().is_some_and(|e| e.state() == State::Committing);
            if committing {
                svc.commit_in_background(true)?;
            } else if svc.cfg.hydrate {
                svc.start_hydration();
            }
        }
        Ok(svc)
    }

    /// The block device to hand to a front end.
    pub fn block_device(&self) -> Arc<SwitchDisk> {
        self.disk.clone()
    }

    /// Registers a listener for state events `(event, message)` (e.g. `--notify`).
    pub fn on_event(&self, f: impl Fn(&str, &str) + Send + Sync + 'static) {
        self.events.lock().push(Box::new(f));
    }

    fn emit(&self, event: &str, msg: &str) {
        tracing::info!(event, "{msg}");
        for f in self.events.lock().iter() {
            f(event, msg);
        }
    }

    /// True while a VM is connected, or requests it issued are still finishing.
    pub fn vm_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The engine, while the target is served.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.lock().clone()
    }

    /// What is served.
    pub fn mode(&self) -> Mode {
        *self.mode.lock()
    }

    /// The hydrator, while one runs.
    pub fn hydrator(&self) -> Option<Arc<Hydrator>> {
        self.bg.lock().hydrator.as_ref().map(|(h, _)| h.clone())
    }

    /// The last error worth reporting (failed commit, hydration or fallback; otherwise the
    /// last failed fetch).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .clone()
            .or_else(|| self.engine().and_then(|e| e.last_fetch_error()))
    }

    /// Engine status, or a minimal one for a plain disk.
    pub fn status(&self) -> Status {
        match self.engine() {
            Some(e) => e.status(),
            None => Status {
                state: match self.mode() {
                    Mode::Source => "rolled-back".into(),
                    _ => "plain".into(),
                },
                target_size: self.disk.capacity(),
                ..Status::default()
            },
        }
    }

    /// Trial starts allowed.
    pub fn max_trial_starts(&self) -> u8 {
        self.max_trial
    }

    fn start_hydration(&self) {
        let Some(engine) = self.engine() else { return };
        let mut bg = self.bg.lock();
        if bg.hydrator.is_some() {
            return;
        }
        let opts = HydrateOptions {
            profile: self.profile_chunks.clone(),
            ..HydrateOptions::default()
        };
        let h = Arc::new(Hydrator::new(opts, self.cfg.hydrate_rate));
        let (h2, err) = (h.clone(), self.last_error.clone());
        let me = self.me.lock().clone();
        let t = std::thread::Builder::new()
            .name("hydrator".into())
            .spawn(move || match h2.run(&engine, &|_, _| {}) {
                Ok(r) if r.area_full => {
                    tracing::info!("released area full: hydration waits for commit")
                }
                Ok(r) if r.stopped => {
                    tracing::info!(bytes = r.bytes, missing = r.missing, "hydration stopped")
                }
                Ok(r) => {
                    let msg = format!("hydration finished: {} bytes in {:.1} s", r.bytes, r.secs);
                    if let Some(svc) = me.upgrade() {
                        svc.emit("hydration-done", &msg);
                    }
                }
                Err(e) => {
                    tracing::error!("hydration stopped: {e}");
                    *err.lock() = Some(format!("hydration stopped: {e}"));
                }
            })
            .expect("spawn hydrator thread");
        bg.hydrator = Some((h, t));
    }

    /// Stops the hydrator and waits (bounded) for its threads. A fetch stuck retrying an
    /// unreachable server is not waited for: what it would publish is a clean chunk, safe
    /// to lose, and the metadata it needs is committed by whoever flushes next.
    fn stop_hydration(&self) {
        let taken = self.bg.lock().hydrator.take();
        if let Some((h, t)) = taken {
            h.stop();
            if let Some(e) = self.engine() {
                e.cancel_background();
            }
            let deadline = std::time::Instant::now() + HYDRATOR_STOP_WAIT;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    "a hydration fetch is still waiting on the network; not waiting for it"
                );
            }
        }
    }

    /// Confirms the target (ends the trial).
    pub fn confirm(&self) -> Result<String, ServiceError> {
        let _op = self.ops.lock();
        let e = self.engine().ok_or_else(|| {
            ServiceError::Conflict(format!("nothing to confirm: serving {:?}", self.mode()))
        })?;
        match transition(e.state(), Op::Confirm)? {
            Next::Enter(s) => {
                e.update_superblock(|sb| sb.state = s)?;
                self.emit("confirmed", "target confirmed");
                self.save_profile();
                Ok("target confirmed".into())
            }
            _ => Ok("target already confirmed".into()),
        }
    }

    /// Starts commit in the background (from `confirmed`, or resuming `committing`).
    pub fn commit(self: &Arc<Self>) -> Result<String, ServiceError> {
        self.commit_in_background(false)?;
        Ok("commit started".into())
    }

    fn commit_in_background(self: &Arc<Self>, resume: bool) -> Result<(), ServiceError> {
        let _op = self.ops.lock();
        let e = self.engine().ok_or_else(|| {
            ServiceError::Conflict(format!("nothing to commit: serving {:?}", self.mode()))
        })?;
        let state = e.state();
        let next = transition(state, Op::Commit)?;
        if !resume && next == Next::Finish {
            return Err(ServiceError::Conflict("commit is already finishing".into()));
        }
        let mut bg = self.bg.lock();
        if bg.commit.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(ServiceError::Conflict("commit is already running".into()));
        }
        // A commit that stopped on an error resumes here (`Next::Resume`).
        if next == Next::Enter(State::Committing) {
            // The source is abandoned from here on: make that durable before answering,
            // so a status right after "commit started" already says committing.
            e.flush()?;
            e.update_superblock(|sb| sb.state = State::Committing)?;
        }
        // A new attempt: an earlier attempt's failure is no longer the news.
        self.last_error
            .lock()
            .take_if(|m| m.starts_with("commit failed"));
        let svc = self.clone();
        bg.commit = Some(
            std::thread::Builder::new()
                .name("commit".into())
                .spawn(move || {
                    svc.emit("committing", "commit started");
                    svc.stop_hydration();
                    match e.commit(false, HydrateOptions::default(), &|_, _, _| {}) {
                        Ok(()) => {
                            svc.emit("commit-done", "commit finished: the disk holds the target")
                        }
                        Err(_) if svc.stopping.load(std::sync::atomic::Ordering::SeqCst) => {
                            tracing::info!(
                                "commit paused by shutdown; it resumes at the next start"
                            )
                        }
                        Err(err) => {
                            tracing::error!("commit failed: {err}");
                            *svc.last_error.lock() = Some(format!("commit failed: {err}"));
                            svc.emit("commit-failed", &err.to_string());
                        }
                    }
                })
                .expect("spawn commit thread"),
        );
        Ok(())
    }

    /// Rolls back to the source and serves it from now on. Only with no VM connected.
    pub fn rollback(&self) -> Result<String, ServiceError> {
        let _op = self.ops.lock();
        self.do_rollback("rolled back", true)
    }

    /// Rolls back; the caller holds `ops`. With `refuse_if_connected`, refuses while a VM
    /// is connected (checked again once guest I/O is excluded).
    fn do_rollback(&self, why: &str, refuse_if_connected: bool) -> Result<String, ServiceError> {
        let connected = || refuse_if_connected && self.vm_connected();
        if connected() {
            return Err(ServiceError::Conflict(
                "a VM is connected: stop it before rolling back".into(),
            ));
        }
        let Some(e) = self.engine() else {
            return Err(ServiceError::Conflict(format!(
                "nothing to roll back: serving {:?}",
                self.mode()
            )));
        };
        transition(
            e.state(),
            if refuse_if_connected {
                Op::Rollback
            } else {
                Op::Fallback
            },
        )?;
        self.stop_hydration();
        // From here no guest request runs until the swap below.
        let mut slot = self.disk.inner.write();
        if connected() {
            return Err(ServiceError::Conflict(
                "a VM is connected: stop it before rolling back".into(),
            ));
        }
        e.flush()?;
        // A hydration fetch still waiting on the network must never write after this.
        e.retire();
        let source_size = e.layout().source_size;
        let capacity = slot.capacity();
        if let Err(err) = e.with_meta(|m| relocate::rollback(m, &mut |_, _, _| {})) {
            // Part of the source may be home already: serve nothing rather than a mix.
            // A restart resumes the rollback from the disk.
            let msg = format!("rollback failed, restart serve to resume it: {err}");
            let failed: Arc<dyn BlockBackend> = Arc::new(FailedDisk {
                capacity,
                why: msg.clone(),
            });
            self.disk.replace(&mut slot, failed);
            *self.engine.lock() = None;
            *self.last_error.lock() = Some(msg);
            return Err(err.into());
        }
        let source = plain(&self.storage, self.cfg.read_only, source_size)?;
        self.disk.replace(&mut slot, source);
        *self.engine.lock() = None;
        *self.mode.lock() = Mode::Source;
        drop(slot);
        let msg = format!(
            "{why}: the disk holds the source again; writes made to the target were discarded"
        );
        self.emit("rollback-done", &msg);
        Ok(msg)
    }

    /// Saves the recorded boot profile (once; a failure is logged and reported in
    /// `last_error`, it never fails the operation that ends the recording).
    fn save_profile(&self) {
        let Some(r) = &self.recorder else { return };
        match r.freeze_and_save() {
            Ok(true) => self.emit(
                "profile-saved",
                &format!("boot profile of {} chunks saved", r.len()),
            ),
            Ok(false) => {}
            Err(err) => {
                tracing::error!("saving the boot profile failed: {err}");
                *self.last_error.lock() = Some(format!("saving the boot profile failed: {err}"));
            }
        }
    }

    /// Stops background work and makes everything durable (on shutdown).
    pub fn shutdown(&self) -> Result<(), ServiceError> {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.save_profile();
        self.stop_hydration();
        if let Some(e) = self.engine() {
            // A commit waiting on the network stops here; it resumes at the next start.
            e.cancel_background();
        }
        let commit = self.bg.lock().commit.take();
        if let Some(t) = commit {
            // A commit in progress is resumable: stop waiting for it only if it is done.
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::info!("commit still running at shutdown; it resumes at the next start");
            }
        }
        self.disk.flush()?;
        Ok(())
    }
}
