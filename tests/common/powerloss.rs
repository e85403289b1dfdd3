//! Power-loss simulation: an in-memory disk with a volatile write cache.
//!
//! Writes, zeroings and length changes land in a volatile overlay and are readable at
//! once; `sync` makes them durable. A seeded "power cut" after N mutating operations
//! makes that operation and every later one fail with an I/O error (the process dies).
//! [`PowerLossDisk::crash_image`] then returns what a real disk may hold: the durable
//! image plus each unflushed operation (the one cut included) kept whole, dropped, or
//! torn at 512-byte sector granularity, in issue order.

use std::io;

use boot_relocator::Storage;
use parking_lot::Mutex;
use rand::Rng;

/// Granularity at which a disk may tear a write.
pub const SECTOR: u64 = 512;

/// An operation not yet covered by a completed sync.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    SetLen(u64),
}

#[derive(Debug)]
struct Inner {
    /// What survives any cut.
    durable: Vec<u8>,
    /// What reads return: durable plus pending.
    view: Vec<u8>,
    pending: Vec<Pending>,
    /// Mutating operations (write, zero, set_len, sync) issued so far.
    ops: u64,
    /// The operation index at which power fails.
    cut_at: Option<u64>,
    dead: bool,
}

/// A disk image in memory whose unflushed writes a power cut may lose or tear.
#[derive(Debug)]
pub struct PowerLossDisk {
    inner: Mutex<Inner>,
    block_device: bool,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

/// Applies `op` to `img` (a regular file grows on writes past its end).
fn apply(img: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*offset as usize..end].copy_from_slice(data);
        }
        Pending::Zero { offset, len } => {
            let end = ((offset + len) as usize).min(img.len());
            if (*offset as usize) < end {
                img[*offset as usize..end].fill(0);
            }
        }
        Pending::SetLen(n) => img.resize(*n as usize, 0),
    }
}

impl PowerLossDisk {
    /// A disk whose durable (and current) contents are `image`; no cut planned.
    pub fn new(image: Vec<u8>, block_device: bool) -> Self {
        Self {
            inner: Mutex::new(Inner {
                durable: image.clone(),
                view: image,
                pending: Vec::new(),
                ops: 0,
                cut_at: None,
                dead: false,
            }),
            block_device,
        }
    }

    /// Plans the power cut: operation number `n` (0-based, counting writes, zeroings,
    /// length changes and syncs from now on) and everything after it fail.
    pub fn cut_after(&self, n: u64) {
        let mut g = self.inner.lock();
        g.cut_at = Some(g.ops + n);
    }

    /// Mutating operations issued so far.
    pub fn ops(&self) -> u64 {
        self.inner.lock().ops
    }

    /// True once the power was cut.
    pub fn is_dead(&self) -> bool {
        self.inner.lock().dead
    }

    /// Unflushed operations (the cut one included).
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// The durable image only (every unflushed operation lost).
    pub fn durable(&self) -> Vec<u8> {
        self.inner.lock().durable.clone()
    }

    /// What the disk holds after the power came back: the durable image plus a seeded
    /// choice, per unflushed operation, of kept whole / dropped / torn (each 512-byte
    /// sector kept or not).
    pub fn crash_image(&self, rng: &mut impl Rng) -> Vec<u8> {
        let g = self.inner.lock();
        let mut img = g.durable.clone();
        for op in &g.pending {
            match rng.random_range(0..3) {
                0 => apply(&mut img, op),
                1 => {}
                _ => match op {
                    Pending::SetLen(_) => {
                        if rng.random_bool(0.5) {
                            apply(&mut img, op)
                        }
                    }
                    Pending::Write { offset, data } => {
                        let end = offset + data.len() as u64;
                        let mut at = *offset;
                        while at < end {
                            let next = ((at / SECTOR + 1) * SECTOR).min(end);
                            if rng.random_bool(0.5) {
                                let part = &data[(at - offset) as usize..(next - offset) as usize];
                                apply(
                                    &mut img,
                                    &Pending::Write {
                                        offset: at,
                                        data: part.to_vec(),
                                    },
                                );
                            }
                            at = next;
                        }
                    }
                    Pending::Zero { offset, len } => {
                        let end = offset + len;
                        let mut at = *offset;
                        while at < end {
                            let next = ((at / SECTOR + 1) * SECTOR).min(end);
                            if rng.random_bool(0.5) {
                                apply(
                                    &mut img,
                                    &Pending::Zero {
                                        offset: at,
                                        len: next - at,
                                    },
                                );
                            }
                            at = next;
                        }
                    }
                },
            }
        }
        img
    }

    /// Counts one mutating operation; `Err` (and `op` recorded as in flight) if the
    /// power is or goes out now.
    fn begin(&self, g: &mut Inner, op: Option<Pending>) -> io::Result<()> {
        if g.dead {
            return Err(power_lost());
        }
        let n = g.ops;
        g.ops += 1;
        if g.cut_at == Some(n) {
            g.dead = true;
            if let Some(op) = op {
                g.pending.push(op);
            }
            return Err(power_lost());
        }
        Ok(())
    }

    fn mutate(&self, op: Pending) -> io::Result<()> {
        let mut g = self.inner.lock();
        if self.block_device {
            let len = g.view.len() as u64;
            let end = match &op {
                Pending::Write { offset, data } => offset + data.len() as u64,
                Pending::Zero { offset, len } => offset + len,
                Pending::SetLen(_) => unreachable!("set_len refused earlier"),
            };
            if end > len {
                return Err(io::Error::other("write past the end of the device"));
            }
        }
        self.begin(&mut g, Some(op.clone()))?;
        apply(&mut g.view, &op);
        g.pending.push(op);
        Ok(())
    }
}

impl Storage for PowerLossDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let g = self.inner.lock();
        if g.dead {
            return Err(power_lost());
        }
        buf.fill(0);
        let start = (offset as usize).min(g.view.len());
        let end = (offset as usize + buf.len()).min(g.view.len());
        buf[..end - start].copy_from_slice(&g.view[start..end]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.mutate(Pending::Write {
            offset,
            data: buf.to_vec(),
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut g = self.inner.lock();
        self.begin(&mut g, None)?;
        let Inner {
            durable, pending, ..
        } = &mut *g;
        for op in pending.drain(..) {
            apply(durable, &op);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let g = self.inner.lock();
        if g.dead {
            return Err(power_lost());
        }
        Ok(g.view.len() as u64)
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot change its length",
            ));
        }
        self.mutate(Pending::SetLen(len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(Pending::Zero { offset, len })
    }
}
