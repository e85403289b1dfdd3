//! A small pool of I/O threads for requests that may wait on the network.
//!
//! Queue workers hand such requests here so that requests for local data keep flowing;
//! each job reports its completion to its queue itself (see [`super::queue::QueueCtx`]).
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

/// A fixed set of threads running [`Job`]s in submission order, several at a time.
pub(crate) struct IoPool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    pending: Arc<Pending>,
}

impl IoPool {
    /// Starts `threads` I/O threads (at least one).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let pending = Arc::new(Pending::default());
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let pending = pending.clone();
            let handle = thread::Builder::new()
                .name(format!("vhost-blk-io{i}"))
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
            pending,
        })
    }

    /// Queues a job; gives it back when the pool has been shut down.
    pub(crate) fn submit(&self, job: Job) -> Result<(), Job> {
        let tx = self.tx.lock();
        let Some(tx) = tx.as_ref() else {
            return Err(job);
        };
        self.pending.add();
        tx.send(job).map_err(|mpsc::SendError(job)| {
            self.pending.done();
            job
        })
    }

    /// Number of jobs queued or running.
    pub(crate) fn pending(&self) -> usize {
        *self.pending.count.lock()
    }

    /// Blocks until every submitted job has finished.
    pub(crate) fn wait_idle(&self) {
        let mut n = self.pending.count.lock();
        while *n > 0 {
            self.pending.idle.wait(&mut n);
        }
    }

    /// Finishes the queued jobs and stops the threads.
    pub(crate) fn shutdown(&self) {
        self.tx.lock().take();
        for handle in self.threads.lock().drain(..) {
            if handle.join().is_err() {
                tracing::error!("an I/O thread panicked");
            }
        }
    }
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
            pool.submit(Box::new(move || {
                thread::sleep(Duration::from_millis(20));
                done.fetch_add(1, Ordering::SeqCst);
            }))
            .map_err(|_| ())
            .unwrap();
        }
        pool.wait_idle();
        assert_eq!(done.load(Ordering::SeqCst), 9);
        assert_eq!(pool.pending(), 0);
        pool.shutdown();
        assert!(pool.submit(Box::new(|| {})).is_err());
    }
}
