//! The request path: reads and writes of target byte ranges, split at chunk
//! boundaries; missing chunks are fetched (or, for whole-chunk writes, materialized).

use std::sync::atomic::Ordering;

use boot_relocator::{Entry, Location};

use super::chunk_map::meta_io;
use super::{ChunkIdx, Counters, Engine, FetchKind, FlightResult};
use crate::blockdev::{
    check_range, read_storage, write_storage, BlockError, GuestBuf, GuestBufMut,
};

impl Engine {
    /// Disk address of chunk `c`'s bytes at `loc`.
    pub(super) fn addr(&self, c: u64, loc: Location) -> u64 {
        match loc {
            Location::Home => c << self.layout.chunk_shift,
            Location::Slot(s) => self.layout.slot_addr(s),
            _ => unreachable!("no address for {loc:?}"),
        }
    }

    /// Splits the byte range `offset..offset+len` at chunk boundaries: yields (chunk,
    /// offset inside the chunk, range of the caller's buffer).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
        let cs = self.chunk_size();
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done as u64;
            let within = pos % cs;
            let n = ((cs - within) as usize).min(len - done);
            let piece = (pos / cs, within, done..done + n);
            done += n;
            Some(piece)
        })
    }

    /// Reads `buf.len()` bytes of the target at `offset` into an owned buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_into(offset, &GuestBufMut::from_slice(buf))
    }

    /// Reads `buf.len()` bytes of the target at `offset` into `buf` (guest memory): local
    /// chunks with one `preadv` each, fetched bytes with volatile copies.
    pub fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        let _timer = self.counters.latency.read.timer();
        check_range(offset, buf.len() as u64, self.layout.target_size)?;
        self.counters.note_read(buf.len() as u64);
        for (c, within, r) in self.pieces(offset, buf.len()) {
            if let Some(rec) = &self.recorder {
                rec.note(c);
            }
            self.read_chunk(c, within, &buf.range(r))?;
        }
        Ok(())
    }

    fn read_chunk(&self, c: u64, within: u64, out: &GuestBufMut<'_>) -> Result<(), BlockError> {
        loop {
            {
                let _g = self.map.stripe(c).read();
                let e = self.map.locate(c)?;
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        read_storage(self.storage.as_ref(), self.addr(c, e.loc) + within, out)?;
                        return Ok(());
                    }
                    Location::Zero => {
                        out.fill_zero();
                        return Ok(());
                    }
                    Location::Missing => {}
                }
            }
            match self.fetch(ChunkIdx(c), FetchKind::Demand)? {
                FlightResult::Uncached { first, bytes } => {
                    let at = ((c - first.0) * self.chunk_size() + within) as usize;
                    out.copy_from(&bytes[at..at + out.len()]);
                    Counters::add(&self.counters.uncached_reads, 1);
                    return Ok(());
                }
                FlightResult::Mapped => continue,
                FlightResult::Failed(m) => return Err(BlockError::Remote(m)),
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
            }
        }
    }

    /// Writes `data` (an owned buffer) at `offset` of the target.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.write_from(offset, &GuestBuf::from_slice(data))
    }

    /// Writes `data` (guest memory) at `offset` of the target: one `pwritev` per chunk.
    pub fn write_from(&self, offset: u64, data: &GuestBuf<'_>) -> Result<(), BlockError> {
        let _timer = self.counters.latency.write.timer();
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.layout.target_size)?;
        Counters::add(&self.counters.written_bytes, data.len() as u64);
        for (c, within, r) in self.pieces(offset, data.len()) {
            self.write_chunk(c, within, &data.range(r))?;
        }
        self.bound_dirty_pages()
    }

    pub(super) fn write_chunk(
        &self,
        c: u64,
        within: u64,
        data: &GuestBuf<'_>,
    ) -> Result<(), BlockError> {
        let whole = within == 0 && data.len() == self.layout.target_len(c);
        loop {
            {
                let _g = self.map.stripe(c).read();
                let m = self.map.lock();
                let e = m.store.entry(c).map_err(meta_io)?;
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        if matches!(e.loc, Location::Slot(_)) && !e.dirty {
                            drop((m, _g));
                            self.make_dirty_durable(c)?;
                            continue;
                        }
                        drop(m);
                        write_storage(self.storage.as_ref(), self.addr(c, e.loc) + within, data)?;
                        return Ok(());
                    }
                    Location::Zero | Location::Missing if whole => {}
                    Location::Zero => {
                        drop(m);
                        drop(_g);
                        self.materialize(c, None)?;
                        continue;
                    }
                    Location::Missing => {}
                }
            }
            if whole {
                return self.materialize(c, Some(data));
            }
            match self.fetch(ChunkIdx(c), FetchKind::Demand)? {
                FlightResult::Mapped => continue,
                FlightResult::Uncached { .. } => {
                    Counters::add(&self.counters.nospace_errors, 1);
                    return Err(BlockError::NoSpace);
                }
                FlightResult::Failed(m) => return Err(BlockError::Remote(m)),
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
            }
        }
    }

    /// Gives chunk `c` (missing or zero) a dirty slot holding `data` (a whole chunk) or
    /// zeros. After commit started the chunk goes straight home instead.
    fn materialize(&self, c: u64, data: Option<&GuestBuf<'_>>) -> Result<(), BlockError> {
        let len = self.layout.target_len(c);
        let zeros;
        let bytes = match data {
            Some(d) => d.clone(),
            None => {
                zeros = vec![0u8; len];
                GuestBuf::from_slice(&zeros)
            }
        };
        let st = self.storage.as_ref();
        let home = self.to_home.load(Ordering::Acquire);
        let slot = if home {
            None
        } else {
            Some(self.get_slot(true)?.0)
        };
        if let Some(s) = slot {
            if let Err(err) = write_storage(st, self.layout.slot_addr(s), &bytes) {
                self.with_meta(|m| m.free_unpublished(s));
                return Err(err.into());
            }
        }
        let _g = self.map.stripe(c).write();
        let mut m = self.map.lock();
        let e = match m.store.entry(c) {
            Ok(e) => e,
            Err(err) => {
                if let Some(s) = slot {
                    m.store.free_unpublished(s);
                }
                return Err(meta_io(err));
            }
        };
        match (e.loc, slot) {
            (Location::Missing | Location::Zero, Some(s)) => {
                let slotted = Entry {
                    loc: Location::Slot(s),
                    dirty: true,
                    ..e
                };
                if let Err(err) = self.map.set_entry(&mut m.store, c, slotted) {
                    m.store.free_unpublished(s);
                    return Err(err);
                }
            }
            (Location::Missing | Location::Zero, None) => {
                drop(m);
                write_storage(st, self.addr(c, Location::Home), &bytes)?;
                let mut m = self.map.lock();
                self.map.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Home,
                        dirty: true,
                        ..e
                    },
                )?;
            }
            (loc, s) => {
                // Someone mapped the chunk meanwhile: our write still has to land, on top.
                if let Some(s) = s {
                    m.store.free_unpublished(s);
                }
                if let Location::Slot(_) = loc {
                    self.map
                        .set_entry(&mut m.store, c, Entry { dirty: true, ..e })?;
                    if let Some(l) = m.lru.as_mut() {
                        l.pop(&c);
                    }
                }
                drop(m);
                if data.is_some() {
                    write_storage(st, self.addr(c, loc), &bytes)?;
                }
            }
        }
        Ok(())
    }
}
