//! [`ReplyBudget`]: bytes of reply buffers the server may hold at once, shared by all
//! connections. A read takes its share before it allocates and gives it back when its
//! reply has been written (or has failed), waiting while the budget is spent. Each
//! connection also has its own cap, so one connection alone cannot take all of it.
//!
//! Why: a client that sends many large reads and never reads the replies makes every
//! read worker hold a full reply buffer, blocked in `write`. Without a budget that was
//! ~131 MB per connection (four 32 MiB replies), ~8 GiB at the default connection cap.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// A byte semaphore.
#[derive(Debug)]
pub struct ReplyBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl ReplyBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        ReplyBudget {
            total,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// The size of the budget.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes taken right now.
    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    /// Waits until `n` bytes (at most the total) are free and takes them.
    fn take(&self, n: u64) {
        let n = n.min(self.total);
        let mut used = self.used.lock();
        while *used + n > self.total {
            self.freed.wait(&mut used);
        }
        *used += n;
    }

    fn give(&self, n: u64) {
        let n = n.min(self.total);
        *self.used.lock() -= n;
        self.freed.notify_all();
    }
}

/// The budgets one connection draws from: its own cap, then the server's.
#[derive(Clone, Debug)]
pub struct ConnectionBudget {
    own: Arc<ReplyBudget>,
    global: Arc<ReplyBudget>,
}

impl ConnectionBudget {
    /// A connection's share of `global`: at most `cap` bytes at once.
    pub fn new(global: Arc<ReplyBudget>, cap: u64) -> Self {
        ConnectionBudget {
            own: Arc::new(ReplyBudget::new(cap)),
            global,
        }
    }

    /// Takes `n` bytes, waiting for the connection's cap first, then for the global
    /// budget (always in this order, so waits never form a cycle).
    pub fn acquire(&self, n: u64) -> BudgetGuard<'_> {
        self.own.take(n);
        self.global.take(n);
        BudgetGuard { budget: self, n }
    }
}

/// Bytes taken from a [`ConnectionBudget`], given back on drop.
#[derive(Debug)]
pub struct BudgetGuard<'a> {
    budget: &'a ConnectionBudget,
    n: u64,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        self.budget.global.give(self.n);
        self.budget.own.give(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_for_freed_bytes_and_caps_each_connection() {
        let global = Arc::new(ReplyBudget::new(100));
        let a = ConnectionBudget::new(global.clone(), 60);
        let b = ConnectionBudget::new(global.clone(), 60);
        let g1 = a.acquire(60);
        assert_eq!(global.used(), 60);
        let g2 = b.acquire(40);
        assert_eq!(global.used(), 100);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let _g = a.acquire(10); // waits for a's own cap, then for the global
                global.used()
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!t.is_finished());
            drop(g1);
            assert!(t.join().unwrap() <= 100);
        });
        drop(g2);
        assert_eq!(global.used(), 0);
        // Larger than the whole budget: clamped, never a deadlock.
        drop(a.acquire(1000));
        assert_eq!(global.used(), 0);
    }
}
