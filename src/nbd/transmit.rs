//! The transmission phase of the NBD protocol: requests in, replies out, over any
//! `Read + Write`, with bounded memory ([`ReplyBudget`](super::budget::ReplyBudget)) and
//! an idle timeout.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::budget::ConnectionBudget;
use super::proto::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO, EPERM,
    MAX_REQUEST_LEN, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REQUEST_LEN, REQUEST_MAGIC, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_LEN,
    STRUCTURED_REPLY_MAGIC,
};
use super::{Export, NbdError};

/// One transmission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (FUA, ...): accepted and ignored, the export is read-only.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Parses the 28 bytes of a request.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic {
                what: "request",
                found: magic.into(),
            });
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
            len: u32::from_be_bytes(b[24..28].try_into().expect("4")),
        })
    }
}

/// Writes a simple reply header for `cookie` into the first 16 bytes of `out`.
fn reply_header(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Writes a structured chunk header (DONE set) into the first 20 bytes of `out`.
fn structured_header(out: &mut [u8], kind: u16, cookie: u64, payload_len: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&payload_len.to_be_bytes());
}

/// Replies without data: success or an errno, in the negotiated reply style.
fn status_reply(w: &mut impl Write, structured: bool, error: u32, cookie: u64) -> io::Result<()> {
    if !structured {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        reply_header(&mut h, error, cookie);
        w.write_all(&h)?;
    } else if error == 0 {
        let mut h = [0u8; STRUCTURED_REPLY_LEN];
        structured_header(&mut h, REPLY_TYPE_NONE, cookie, 0);
        w.write_all(&h)?;
    } else {
        // Payload: the error and an empty message.
        let mut m = [0u8; STRUCTURED_REPLY_LEN + 6];
        structured_header(&mut m, REPLY_TYPE_ERROR, cookie, 6);
        m[STRUCTURED_REPLY_LEN..STRUCTURED_REPLY_LEN + 4].copy_from_slice(&error.to_be_bytes());
        w.write_all(&m)?;
    }
    w.flush()
}

/// What a transmission phase did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransmitStats {
    /// Read requests answered with data.
    pub reads: u64,
    /// Bytes of data sent.
    pub bytes_read: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// True when the client ended with `NBD_CMD_DISC` (false: it just closed).
    pub disconnected: bool,
}

/// Limits of one transmission phase (see [`transmit_with`]).
#[derive(Clone, Debug, Default)]
pub struct TransmitOptions {
    /// Threads serving reads concurrently (0: every request in order on the caller).
    pub workers: usize,
    /// Reply memory: a read waits for its share before allocating. `None`: unbounded
    /// (in-memory tests and fuzzing).
    pub budget: Option<ConnectionBudget>,
    /// End the connection when no request came and no reply was pending for this long.
    /// Only seen when reads from `r` fail with `TimedOut`/`WouldBlock` (a socket read
    /// timeout, which the caller sets to a short tick); such a failure is otherwise
    /// harmless: the request being read is resumed where it stopped, after checking
    /// whether a worker's reply failed (which ends the connection).
    pub idle_timeout: Option<Duration>,
    /// A reply must be taken whole by the client within about this long (checked after
    /// each partial write; the caller also sets the socket's write timeout to it), else
    /// the connection ends: a client reading a byte now and then cannot keep its share
    /// of the budget. `None`: no limit.
    pub reply_timeout: Option<Duration>,
}

/// Writes replies for one connection: each reply whole under one lock, so replies of
/// concurrent reads never interleave on the wire.
struct Replier<'a, W> {
    out: Mutex<&'a mut W>,
    structured: bool,
    stats: Mutex<TransmitStats>,
    /// The first write error of a worker: the connection is broken.
    broken: Mutex<Option<io::Error>>,
    /// Set with `broken` and never cleared (the reader takes the error out of `broken`):
    /// reads still queued are dropped unanswered.
    dead: std::sync::atomic::AtomicBool,
    budget: Option<ConnectionBudget>,
    /// Reads handed to workers and not answered yet.
    pending: AtomicUsize,
    /// Last request received or reply sent.
    activity: Mutex<Instant>,
    reply_timeout: Option<Duration>,
}

impl<W: Write> Replier<'_, W> {
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.out.lock();
        let started = Instant::now();
        let mut at = 0;
        while at < bytes.len() {
            match w.write(&bytes[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if at < bytes.len() && self.reply_timeout.is_some_and(|t| started.elapsed() > t) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not take a reply in time",
                ));
            }
        }
        w.flush()?;
        *self.activity.lock() = Instant::now();
        Ok(())
    }

    /// A reply without data; counts it as an error unless `error` is 0.
    fn status(&self, error: u32, cookie: u64) -> io::Result<()> {
        if error != 0 {
            self.stats.lock().errors += 1;
        }
        let mut w = self.out.lock();
        status_reply(&mut **w, self.structured, error, cookie)?;
        *self.activity.lock() = Instant::now();
        Ok(())
    }

    /// Serves a read (range and length already checked) and sends its reply. The reply
    /// buffer, plus one chunk the export may load meanwhile, is taken from the budget
    /// first (waiting for it).
    fn read(&self, export: &dyn Export, req: Request) -> io::Result<()> {
        // Structured: chunk header, then the offset, then the data.
        let head = if self.structured {
            STRUCTURED_REPLY_LEN + 8
        } else {
            SIMPLE_REPLY_LEN
        };
        let charge = (head + req.len as usize) as u64 + u64::from(export.preferred_block_size());
        let _share = self.budget.as_ref().map(|b| b.acquire(charge));
        let mut out = vec![0u8; head + req.len as usize];
        match export.read_at(req.offset, &mut out[head..]) {
            Ok(()) => {
                if self.structured {
                    structured_header(&mut out, REPLY_TYPE_OFFSET_DATA, req.cookie, req.len + 8);
                    out[STRUCTURED_REPLY_LEN..head].copy_from_slice(&req.offset.to_be_bytes());
                } else {
                    reply_header(&mut out, 0, req.cookie);
                }
                self.send(&out)?;
                let mut st = self.stats.lock();
                st.reads += 1;
                st.bytes_read += u64::from(req.len);
                Ok(())
            }
            Err(reason) => {
                // The reason (paths, URLs) goes to the log only; the peer gets EIO.
                tracing::warn!(offset = req.offset, len = req.len, %reason, "read failed");
                self.status(EIO, req.cookie)
            }
        }
    }

    /// Like [`Replier::read`], for a worker: a write error is kept for the reader, and
    /// once the connection is broken queued reads are dropped unanswered.
    fn read_or_break(&self, export: &dyn Export, req: Request) {
        if !self.dead.load(Ordering::SeqCst) {
            if let Err(e) = self.read(export, req) {
                self.dead.store(true, Ordering::SeqCst);
                self.broken.lock().get_or_insert(e);
            }
        }
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Called when a read from the client timed out: `Err` ends the connection (a worker
    /// failed to write, or the client has been idle too long).
    fn on_stall(&self, idle_timeout: Option<Duration>, e: io::Error) -> Result<(), NbdError> {
        if let Some(b) = self.broken.lock().take() {
            return Err(b.into());
        }
        drop(e);
        let quiet = self.activity.lock().elapsed();
        match idle_timeout {
            Some(idle) if self.pending.load(Ordering::SeqCst) == 0 && quiet >= idle => {
                Err(NbdError::Idle(idle))
            }
            _ => Ok(()),
        }
    }
}

/// True for the errors a socket read timeout produces.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Fills `buf` from `r`, calling `stall` on each read timeout (which may end it with an
/// error) and resuming where it stopped. `Ok(false)`: end of input before the first byte.
fn read_patiently<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    stall: &mut dyn FnMut(io::Error) -> Result<(), NbdError>,
) -> Result<bool, NbdError> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => stall(e)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Serves requests on `export` from `r`, replying on `w`, until `NBD_CMD_DISC` or the end
/// of the stream: [`transmit_with`] with `workers` threads, no memory budget and no idle
/// timeout.
pub fn transmit<R: Read, W: Write + Send>(
    r: &mut R,
    w: &mut W,
    export: &dyn Export,
    structured: bool,
    workers: usize,
) -> Result<TransmitStats, NbdError> {
    let opts = TransmitOptions {
        workers,
        ..TransmitOptions::default()
    };
    transmit_with(r, w, export, structured, &opts)
}

/// Serves requests on `export` from `r`, replying on `w`, until `NBD_CMD_DISC` or the end
/// of the stream. Reads outside the export or longer than [`MAX_REQUEST_LEN`] get
/// `EINVAL`, a failed read `EIO`; writes, trims and write-zeroes `EPERM` (a write's payload
/// is consumed first so the stream stays in sync); unknown commands `EINVAL`. A bad
/// request magic, a write payload over the limit, an I/O error or the idle timeout end
/// the connection.
///
/// With `workers` > 0, that many threads serve reads concurrently (a read waiting on the
/// network does not hold up reads of cached chunks) and replies may come out of order, as
/// the protocol allows; with 0 every request is answered in order on this thread. After
/// `NBD_CMD_DISC` or the end of input, reads already received are still answered.
pub fn transmit_with<R: Read, W: Write + Send>(
    r: &mut R,
    w: &mut W,
    export: &dyn Export,
    structured: bool,
    opts: &TransmitOptions,
) -> Result<TransmitStats, NbdError> {
    let workers = opts.workers;
    let rep = Replier {
        out: Mutex::new(w),
        structured,
        stats: Mutex::new(TransmitStats::default()),
        broken: Mutex::new(None),
        dead: std::sync::atomic::AtomicBool::new(false),
        budget: opts.budget.clone(),
        pending: AtomicUsize::new(0),
        activity: Mutex::new(Instant::now()),
        reply_timeout: opts.reply_timeout,
    };
    let (tx, rx) = mpsc::sync_channel::<Request>(2 * workers.max(1));
    let rx = Mutex::new(rx);
    let result = std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let Ok(req) = rx.lock().recv() else {
                    break;
                };
                rep.read_or_break(export, req);
            });
        }
        let dispatch = |req: Request| -> io::Result<()> {
            if workers == 0 {
                return rep.read(export, req);
            }
            rep.pending.fetch_add(1, Ordering::SeqCst);
            tx.send(req)
                .map_err(|_| io::Error::other("read workers stopped"))
        };
        let r = requests(r, &rep, export, opts.idle_timeout, dispatch);
        drop(tx);
        r
    });
    let stats = *rep.stats.lock();
    result.map(|disconnected| TransmitStats {
        disconnected,
        ..stats
    })
}

/// The request loop of [`transmit_with`]: answers everything but valid reads itself and
/// hands those to `dispatch`. Ok(true) after `NBD_CMD_DISC`, Ok(false) at the end of input.
fn requests<R: Read, W: Write>(
    r: &mut R,
    rep: &Replier<'_, W>,
    export: &dyn Export,
    idle_timeout: Option<Duration>,
    dispatch: impl Fn(Request) -> io::Result<()>,
) -> Result<bool, NbdError> {
    let mut stall = |e| rep.on_stall(idle_timeout, e);
    loop {
        if let Some(e) = rep.broken.lock().take() {
            return Err(e.into());
        }
        let mut raw = [0u8; REQUEST_LEN];
        if !read_patiently(r, &mut raw, &mut stall)? {
            return Ok(false);
        }
        *rep.activity.lock() = Instant::now();
        let req = Request::parse(&raw)?;
        match req.kind {
            CMD_READ => {
                let in_range = req
                    .offset
                    .checked_add(req.len.into())
                    .is_some_and(|end| end <= export.size());
                if req.len == 0 || req.len > MAX_REQUEST_LEN || !in_range {
                    rep.status(EINVAL, req.cookie)?;
                } else {
                    dispatch(req)?;
                }
            }
            CMD_WRITE => {
                if req.len > MAX_REQUEST_LEN {
                    return Err(NbdError::RequestTooLong(req.len));
                }
                // Consumed (and dropped) in small pieces: nothing is allocated for it.
                let mut left = req.len as usize;
                let mut sink = [0u8; 16 * 1024];
                while left > 0 {
                    let n = left.min(sink.len());
                    if !read_patiently(r, &mut sink[..n], &mut stall)? {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                    left -= n;
                }
                rep.status(EPERM, req.cookie)?;
            }
            CMD_DISC => return Ok(true),
            CMD_FLUSH => rep.status(0, req.cookie)?,
            CMD_TRIM | CMD_WRITE_ZEROES => rep.status(EPERM, req.cookie)?,
            _ => rep.status(EINVAL, req.cookie)?,
        }
    }
}
