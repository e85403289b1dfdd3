//! A small pool of I/O threads for requests that do not run on their queue's worker, in
//! two lanes: requests that may wait on the network ([`Lane::Remote`]), so that requests
//! for local data keep flowing, and large local requests ([`Lane::Bulk`]), so that
//! several proceed in parallel. The lanes have their own threads: a large local request
//! never waits behind a network fetch.
//!
//! Each job reports its completion to its queue itself (see [`super::queue::QueueCtx`]).
//! The pool outlives connections: a job still running when a frontend disconnects is
//! finished before the next connection is served (see [`IoPool::wait_idle`]).

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use parking_lot::{Condvar, Mutex};

/// Work for an I/O thread.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Pending {
    fn add(&self) {
        *self.count.lock() += 1;
    }

    fn done(&self) {
        let mut n = self.count.lock();
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }
}

/// Which threads of the pool run a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Requests that may wait on the network.
    Remote,
    /// Large requests for local data, run in parallel with each other and with the
    /// queue worker (they only wait on the local disk and on memory bandwidth).
    Bulk,
}

/// The threads of one lane and the channel that feeds them.
struct LaneThreads {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl LaneThreads {
    fn start(name: &str, threads: usize, pending: &Arc<Pending>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let pending = pending.clone();
            let handle = thread::Builder::new()
                .name(format!("{name}{i}"))
                .spawn(move || loop {
                    // Hold the receiver lock only while waiting for the next job.
                    let job = rx.lock().recv();
                    let Ok(job) = job else { break };
                    job();
                    pending.done();
                })?;
            handles.push(handle);
        }
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        })
    }
}

/// Two fixed sets of threads (one per [`Lane`]) running [`Job`]s in submission order,
/// several at a time.
pub(crate) struct IoPool {
    remote: LaneThreads,
    bulk: LaneThreads,
    pending: Arc<Pending>,
}

impl IoPool {
    /// Starts `threads` I/O threads (at least one) for the remote lane and
    /// [`bulk_threads`] for the bulk lane.
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let pending = Arc::new(Pending::default());
        Ok(Self {
            remote: LaneThreads::start("vhost-blk-io", threads, &pending)?,
            bulk: LaneThreads::start("vhost-blk-bulk", bulk_threads(), &pending)?,
            pending,
        })
    }

    fn lane(&self, lane: Lane) -> &LaneThreads {
        match lane {
            Lane::Remote => &self.remote,
            Lane::Bulk => &self.bulk,
        }
    }

    /// Queues a job on `lane`; gives it back when the pool has been shut down.
    pub(crate) fn submit(&self, lane: Lane, job: Job) -> Result<(), Job> {
        let tx = self.lane(lane).tx.lock();
        let Some(tx) = tx.as_ref() else {
            return Err(job);
        };
        self.pending.add();
        tx.send(job).map_err(|mpsc::SendError(job)| {
            self.pending.done();
            job
        })
    }

    /// Number of jobs queued or running, both lanes.
    pub(crate) fn pending(&self) -> usize {
        *self.pending.count.lock()
    }

    /// Waits up to `timeout` for every submitted job to finish; true when none is left.
    pub(crate) fn wait_idle_for(&self, timeout: std::time::Duration) -> bool {
        let mut n = self.pending.count.lock();
        if *n > 0 {
            self.pending.idle.wait_for(&mut n, timeout);
        }
        *n == 0
    }

    /// Finishes the queued jobs and stops the threads. A thread still running a job
    /// once the queue is empty (a fetch that ignores cancellation) is left to the
    /// process exit rather than waited for.
    pub(crate) fn shutdown(&self) {
        for lane in [&self.remote, &self.bulk] {
            lane.tx.lock().take();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        for lane in [&self.remote, &self.bulk] {
            for handle in lane.threads.lock().drain(..) {
                while !handle.is_finished() && std::time::Instant::now() < deadline {
                    thread::sleep(std::time::Duration::from_millis(5));
                }
                if !handle.is_finished() {
                    tracing::warn!("an I/O thread is still busy at shutdown; not waiting for it");
                } else if handle.join().is_err() {
                    tracing::error!("an I/O thread panicked");
                }
            }
        }
    }
}

/// Threads of the bulk lane: two per CPU, between 4 and 16. On a 2-CPU machine 4 threads
/// moved clearly more 1 MiB reads at 8 in flight than 2 did (docs/vhost-user-blk.md);
/// more than 4 there was not measured, nor was any other machine size.
pub(crate) fn bulk_threads() -> usize {
    thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .saturating_mul(2)
        .clamp(4, 16)
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn runs_jobs_concurrently_and_drains() {
        let pool = IoPool::new(3).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..9 {
            let done = done.clone();
            pool.submit(
                Lane::Remote,
                Box::new(move || {
                    thread::sleep(Duration::from_millis(20));
                    done.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .map_err(|_| ())
            .unwrap();
        }
        assert!(pool.wait_idle_for(std::time::Duration::from_secs(10)));
        assert_eq!(done.load(Ordering::SeqCst), 9);
        assert_eq!(pool.pending(), 0);
        pool.shutdown();
        assert!(pool.submit(Lane::Remote, Box::new(|| {})).is_err());
        assert!(pool.submit(Lane::Bulk, Box::new(|| {})).is_err());
    }
}
