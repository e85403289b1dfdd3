//! Zeroing and discarding: whole chunks become `zero` entries without any I/O or fetch.

use std::sync::atomic::Ordering;

use boot_relocator::{Entry, Location};

use super::{meta_io, Engine};
use crate::blockdev::{check_range, BlockError, GuestBuf};

impl Engine {
    /// Makes `[offset, offset+len)` read as zeros; whole chunks become `zero` entries
    /// (their slots are released), partial ones are written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.layout.target_size)?;
        let cs = self.chunk_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            // Once commit started, zeros must land home: no `zero` shortcut then.
            let whole = within == 0 && n as usize == self.layout.target_len(c);
            if whole && !self.to_home.load(Ordering::Acquire) {
                self.make_zero(c, |_| true)?;
            } else {
                let zeros = vec![0u8; n as usize];
                self.write_chunk(c, within, &GuestBuf::from_slice(&zeros))?;
            }
            self.bound_dirty_pages()?;
            pos += n;
        }
        Ok(())
    }

    /// A discard covering whole chunks that are still missing makes them zero chunks:
    /// space the guest gave up is never downloaded (discarded contents are unspecified;
    /// zeros are a valid answer). Local chunks keep their contents.
    pub(super) fn discard_missing(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.to_home.load(Ordering::Acquire) {
            return Ok(()); // commit moves chunks home; let it fetch rather than race it
        }
        let cs = self.chunk_size();
        let end = offset + len;
        for c in offset.div_ceil(cs)..self.layout.chunk_count() {
            if (c * cs + cs).min(self.layout.target_size) > end {
                break;
            }
            self.make_zero(c, |e| e.loc == Location::Missing)?;
            self.bound_dirty_pages()?;
        }
        Ok(())
    }

    /// Makes chunk `c` a zero chunk (its slot, if any, is released) when `when` holds for
    /// its entry, under the chunk's stripe lock.
    fn make_zero(&self, c: u64, when: impl Fn(&Entry) -> bool) -> Result<(), BlockError> {
        let _g = self.map.stripe(c).write();
        let mut m = self.map.lock();
        let e = m.store.entry(c).map_err(meta_io)?;
        if !when(&e) {
            return Ok(());
        }
        if let Some(l) = m.lru.as_mut() {
            l.pop(&c);
        }
        self.map.set_entry(
            &mut m.store,
            c,
            Entry {
                loc: Location::Zero,
                dirty: false,
                ..e
            },
        )
    }
}
