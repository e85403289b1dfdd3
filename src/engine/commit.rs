//! Commit: move every target chunk to its home address, then remove the released area.
//!
//! `committing` is durable before the first home write; from then on the source is
//! abandoned and every step is idempotent: fetches go straight home, slotted chunks are
//! copied home and re-mapped `home`, zero chunks are zeroed at home. A crash anywhere
//! resumes from the map. Runs while a guest keeps reading and writing: each chunk moves
//! under its stripe lock.

use boot_relocator::{relocate, Entry, Location, State};

use super::{ChunkIdx, Engine, EngineError, FetchKind, FlightResult, HydrateOptions, Hydrator};
use crate::blockdev::BlockError;

/// Chunks moved between map commits.
const MOVES_PER_COMMIT: u64 = 64;

impl Engine {
    /// Commits the migration. Allowed from `confirmed`, from `prepared`/`trial` with
    /// `force`, and to resume `committing`/`committed`.
    pub fn commit(
        &self,
        force: bool,
        hydrate: HydrateOptions,
        progress: &(dyn Fn(&str, u64, u64) + Sync),
    ) -> Result<(), EngineError> {
        let state = self.state();
        match state {
            State::Confirmed | State::Committing | State::Committed => {}
            State::Prepared | State::Trial if force => {}
            State::Prepared | State::Trial => {
                return Err(EngineError::State(format!(
                    "the target is in state {state}, not confirmed: confirm it first, or force the commit"
                )))
            }
            s => return Err(EngineError::State(format!("cannot commit in state {s}"))),
        }
        if state != State::Committed {
            self.flush()?;
            if state != State::Committing {
                self.update_superblock(|sb| sb.state = State::Committing)?;
            }
            self.to_home
                .store(true, std::sync::atomic::Ordering::Release);
            let h = Hydrator::new(hydrate, 0);
            h.run(self, &|d, t| {
                progress("fetching the rest straight home", d, t)
            })?;
            self.move_home(progress)?;
            self.update_superblock(|sb| sb.state = State::Committed)?;
        }
        let _c = self.commit_lock.lock();
        relocate::remove_area(&mut self.map.lock().store)?;
        self.finished
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Moves every chunk that is not home yet.
    fn move_home(&self, progress: &(dyn Fn(&str, u64, u64) + Sync)) -> Result<(), EngineError> {
        let total = self.layout.chunk_count();
        loop {
            let mut moved = 0u64;
            for c in 0..total {
                loop {
                    let g = self.map.stripe(c).write();
                    let e = self.map.lock().store.entry(c)?;
                    let home = self.addr(c, Location::Home);
                    let len = self.layout.target_len(c);
                    match e.loc {
                        Location::Home => break,
                        Location::Slot(s) => {
                            let mut buf = vec![0u8; len];
                            self.storage
                                .read_at(self.layout.slot_addr(s), &mut buf)
                                .map_err(BlockError::from)?;
                            self.storage
                                .write_at(home, &buf)
                                .map_err(BlockError::from)?;
                        }
                        Location::Zero => {
                            self.storage
                                .write_zeroes(home, len as u64)
                                .map_err(BlockError::from)?;
                        }
                        Location::Missing => {
                            drop(g);
                            match self.fetch(ChunkIdx(c), FetchKind::Commit)? {
                                FlightResult::Failed(m) => return Err(BlockError::Remote(m).into()),
                                FlightResult::Cancelled => return Err(BlockError::Cancelled.into()),
                                _ => continue,
                            }
                        }
                    }
                    let mut m = self.map.lock();
                    if let Some(l) = m.lru.as_mut() {
                        l.pop(&c);
                    }
                    self.map.set_entry(
                        &mut m.store,
                        c,
                        Entry {
                            loc: Location::Home,
                            dirty: false,
                            ..e
                        },
                    )?;
                    drop(m);
                    moved += 1;
                    if moved % MOVES_PER_COMMIT == 0 {
                        drop(g);
                        self.commit_map()?;
                        progress("moving chunks home", c + 1, total);
                    }
                    break;
                }
            }
            self.commit_map()?;
            progress("moving chunks home", total, total);
            let left = self.map.lock().store.counts().home != total;
            if !left {
                return Ok(());
            }
        }
    }
}
