//! Buffers a block backend reads into or writes from, which may be guest memory.
//!
//! A request's data lives in the guest's memory, which the guest (another vCPU, another
//! request) may change at any moment. Rust references (`&[u8]`, `&mut [u8]`) promise
//! that nobody else changes the bytes while they live, so none is ever made over guest
//! memory: a [`GuestBufMut`] (where a read stores its data) and a [`GuestBuf`] (where a
//! write takes its data from) are lists of vm-memory [`VolatileSlice`]s. Local data moves
//! with one `preadv`/`pwritev` per contiguous device range straight between the file and
//! those pieces ([`read_storage`], [`write_storage`]); data the engine holds in its own
//! buffers (fetched, verified) is copied in with volatile copies.
//!
//! Owned buffers (NBD export, tests) come in through the safe [`GuestBufMut::from_slice`]
//! and [`GuestBuf::from_slice`].

use std::io;
use std::ops::Range;
use std::os::unix::io::AsRawFd;

use boot_relocator::Storage;
use vm_memory::VolatileSlice;

/// Most iovecs one `preadv`/`pwritev` takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The pieces of a buffer, in order; no piece is empty.
#[derive(Clone, Default)]
struct Pieces<'a> {
    pieces: Vec<VolatileSlice<'a>>,
    len: usize,
}

impl<'a> Pieces<'a> {
    fn push(&mut self, s: VolatileSlice<'a>) {
        if !s.is_empty() {
            self.len += s.len();
            self.pieces.push(s);
        }
    }

    /// The bytes `r` of the buffer (panics when `r` is outside it, like slice indexing).
    fn range(&self, r: Range<usize>) -> Self {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "range {r:?} outside a buffer of {} bytes",
            self.len
        );
        let mut out = Pieces::default();
        let mut at = 0usize;
        for p in &self.pieces {
            let (lo, hi) = (at, at + p.len());
            at = hi;
            if hi <= r.start {
                continue;
            }
            if lo >= r.end {
                break;
            }
            let from = r.start.max(lo) - lo;
            let to = r.end.min(hi) - lo;
            // In bounds: from < to <= p.len() by the checks above.
            out.push(p.subslice(from, to - from).expect("piece bounds"));
        }
        out
    }

    /// Calls `f(piece, offset of the piece in the buffer)` for each piece.
    fn each(&self, mut f: impl FnMut(&VolatileSlice<'a>, usize)) {
        let mut at = 0usize;
        for p in &self.pieces {
            f(p, at);
            at += p.len();
        }
    }
}

/// Memory a backend stores a read's data into (guest memory, or an owned buffer).
#[derive(Clone, Default)]
pub struct GuestBufMut<'a>(Pieces<'a>);

/// Memory a backend takes a write's data from (guest memory, or an owned buffer).
#[derive(Clone, Default)]
pub struct GuestBuf<'a>(Pieces<'a>);

impl std::fmt::Debug for GuestBufMut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestBufMut({} bytes in {} pieces)",
            self.0.len,
            self.0.pieces.len()
        )
    }
}

impl std::fmt::Debug for GuestBuf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestBuf({} bytes in {} pieces)",
            self.0.len,
            self.0.pieces.len()
        )
    }
}

impl<'a> GuestBufMut<'a> {
    /// An empty buffer; add memory with [`GuestBufMut::push`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An owned buffer: the backend stores into `buf`.
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        let mut b = Self::new();
        b.push(VolatileSlice::from(buf));
        b
    }

    /// Appends `s` (memory that is written only with volatile accesses, such as a slice
    /// vm-memory handed out for guest memory checked for writing).
    pub fn push(&mut self, s: VolatileSlice<'a>) {
        self.0.push(s);
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The bytes `r` of this buffer (panics when `r` is outside it).
    pub fn range(&self, r: Range<usize>) -> GuestBufMut<'a> {
        Self(self.0.range(r))
    }

    /// Stores zeros in every byte.
    pub fn fill_zero(&self) {
        self.0.each(|p, _| fill_zero(p));
    }

    /// Copies `data` (exactly [`GuestBufMut::len`] bytes) in with volatile stores.
    pub fn copy_from(&self, data: &[u8]) {
        assert_eq!(data.len(), self.0.len, "copy_from: length mismatch");
        self.0.each(|p, at| p.copy_from(&data[at..at + p.len()]));
    }
}

impl<'a> GuestBuf<'a> {
    /// An empty buffer; add memory with [`GuestBuf::push`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An owned buffer: the backend takes the data from `buf`.
    pub fn from_slice(buf: &'a [u8]) -> Self {
        let mut b = Self::new();
        // The slice made here lives no longer than `buf` (it carries 'a). A `GuestBuf` only
        // ever reads through its pieces (no method stores, and the pieces never leave this
        // module), so the shared borrow is never written through; the bytes cannot change
        // meanwhile as `buf` is borrowed for 'a.
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for 'a (see above).
        b.0.push(unsafe { VolatileSlice::new(buf.as_ptr().cast_mut(), buf.len()) });
        b
    }

    /// Appends `s` (memory that is read only with volatile accesses, such as a slice
    /// vm-memory handed out for guest memory checked for reading). The buffer only reads
    /// through it.
    pub fn push(&mut self, s: VolatileSlice<'a>) {
        self.0.push(s);
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The bytes `r` of this buffer (panics when `r` is outside it).
    pub fn range(&self, r: Range<usize>) -> GuestBuf<'a> {
        Self(self.0.range(r))
    }

    /// Copies the bytes out with volatile loads into `out` (exactly [`GuestBuf::len`]).
    pub fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.0.len, "copy_to: length mismatch");
        self.0.each(|p, at| {
            p.copy_to(&mut out[at..at + p.len()]);
        });
    }

    /// The bytes, copied into an owned vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.0.len];
        self.copy_to(&mut v);
        v
    }
}

fn fill_zero(p: &VolatileSlice<'_>) {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut at = 0;
    while at < p.len() {
        let n = (p.len() - at).min(ZEROS.len());
        // In bounds: at + n <= p.len().
        p.subslice(at, n).expect("in bounds").copy_from(&ZEROS[..n]);
        at += n;
    }
}

/// Reads `buf.len()` bytes of `storage` at `offset` into `buf`; bytes past the end read
/// as zeros (as [`Storage::read_at`]). With a file behind the storage this is `preadv`
/// straight into the pieces, one call for all of them (more only for short reads or more
/// than 1024 pieces); otherwise a bounce buffer and volatile copies.
pub fn read_storage(storage: &dyn Storage, offset: u64, buf: &GuestBufMut<'_>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let Some(file) = storage.direct_file(false)? else {
        let mut bounce = vec![0u8; buf.len()];
        storage.read_at(offset, &mut bounce)?;
        buf.copy_from(&bounce);
        return Ok(());
    };
    let guards: Vec<_> = buf.0.pieces.iter().map(|p| p.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    let mut done = 0usize;
    let mut first = 0usize;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(IOV_MAX);
        // Each piece is a `&mut [u8]` borrowed for the buffer's lifetime, or guest memory
        // vm-memory checked for writing, kept mapped by the memory snapshot the caller
        // holds and by `guards`. The kernel stores into it; no Rust reference to it exists.
        // SAFETY: every iovec is valid for writes of `iov_len` bytes (above), and
        // `cnt` <= IOV_MAX with `first + cnt` <= iov.len().
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                cnt as libc::c_int,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // End of file: the rest reads as zeros.
            buf.range(done..buf.len()).fill_zero();
            return Ok(());
        }
        done += n as usize;
        first = advance(&mut iov, first, n as usize);
    }
    Ok(())
}

/// Writes `buf` to `storage` at `offset`: `pwritev` straight from the pieces when a file
/// is behind the storage (one call for all of them, more only for short writes or more
/// than 1024 pieces), otherwise a bounce buffer.
pub fn write_storage(storage: &dyn Storage, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let Some(file) = storage.direct_file(true)? else {
        return storage.write_at(offset, &buf.to_vec());
    };
    let guards: Vec<_> = buf.0.pieces.iter().map(|p| p.ptr_guard()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        })
        .collect();
    let mut done = 0usize;
    let mut first = 0usize;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(IOV_MAX);
        // Each piece is a borrowed slice, or guest memory vm-memory checked for reading,
        // kept mapped by the caller's memory snapshot and by `guards`. The kernel only reads.
        // SAFETY: every iovec is valid for reads of `iov_len` bytes (above), and
        // `cnt` <= IOV_MAX with `first + cnt` <= iov.len().
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov[first..].as_ptr(),
                cnt as libc::c_int,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the disk took no bytes of a write",
            ));
        }
        done += n as usize;
        first = advance(&mut iov, first, n as usize);
    }
    Ok(())
}

/// Drops `n` transferred bytes from the front of `iov[first..]`; returns the new first
/// iovec (one that still has bytes, or `iov.len()`).
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while first < iov.len() && n >= iov[first].iov_len {
        n -= iov[first].iov_len;
        first += 1;
    }
    if n > 0 {
        let v = &mut iov[first];
        // Still inside the same piece: moving its base by n < iov_len bytes stays in it.
        v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
        v.iov_len -= n;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use boot_relocator::FileStorage;

    fn storage(len: u64) -> (tempfile::NamedTempFile, FileStorage) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let s = FileStorage::open(f.path(), true).unwrap();
        (f, s)
    }

    #[test]
    fn vectored_round_trip_over_many_pieces_and_eof() {
        let (_f, st) = storage(3100);
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
        // 1500 pieces of 1..3 bytes: more than one pwritev (IOV_MAX) and odd sizes.
        let mut src = GuestBuf::new();
        let mut at = 0;
        let mut i = 0;
        while at < data.len() {
            let n = (i % 3 + 1).min(data.len() - at);
            src.0
                .push(GuestBuf::from_slice(&data[at..at + n]).0.pieces[0]);
            at += n;
            i += 1;
        }
        assert!(src.0.pieces.len() > IOV_MAX);
        write_storage(&st, 100, &src).unwrap();
        // Read across the end of the file: the tail reads as zeros.
        let mut back = vec![0xAAu8; 3500];
        let (a, b) = back.split_at_mut(1234);
        let mut dst = GuestBufMut::from_slice(a);
        dst.push(VolatileSlice::from(b));
        read_storage(&st, 100, &dst).unwrap();
        assert_eq!(&back[..3000], &data[..]);
        assert_eq!(&back[3000..], &[0u8; 500][..]);
    }

    #[test]
    fn ranges_cross_pieces() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5, 6, 7];
        let mut buf = GuestBufMut::from_slice(&mut a);
        buf.push(VolatileSlice::from(&mut b[..]));
        buf.range(2..5).copy_from(&[9, 9, 9]);
        buf.range(6..7).fill_zero();
        assert_eq!(buf.range(0..0).len(), 0);
        assert_eq!((a, b), ([1, 2, 9], [9, 9, 6, 0]));
    }
}
