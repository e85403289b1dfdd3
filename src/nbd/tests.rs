//! Protocol tests over in-memory byte streams: the client side is written out byte by
//! byte from the protocol's definitions, the server's answers parsed back and checked.

use std::io::{self, Cursor, Read, Write};

use super::proto::*;
use super::*;

/// Client bytes in, server bytes out.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn image() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn catalog() -> MemoryCatalog {
    let mut c = MemoryCatalog::default();
    c.insert("disk", image());
    c.insert("other", vec![9; 4096]);
    c
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn run(client_flags: u32, options: &[Vec<u8>]) -> (Result<Negotiated, NbdError>, Vec<u8>) {
    let mut input = client_flags.to_be_bytes().to_vec();
    for o in options {
        input.extend_from_slice(o);
    }
    let mut d = Duplex {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    let r = negotiate(&mut d, &catalog());
    (r, d.output)
}

/// Parses option replies out of the server output after the 18-byte greeting.
fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    assert_eq!(&out[..8], &NBD_MAGIC.to_be_bytes());
    assert_eq!(&out[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(u16::from_be_bytes([out[16], out[17]]), 3);
    let mut v = Vec::new();
    let mut p = &out[18..];
    while !p.is_empty() {
        assert_eq!(&p[..8], &REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(p[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(p[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
        v.push((opt, kind, p[20..20 + len].to_vec()));
        p = &p[20 + len..];
    }
    v
}

const FIXED: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn go_with_block_size() {
    let (r, out) = run(
        FIXED,
        &[option(OPT_GO, &go_data("disk", &[INFO_BLOCK_SIZE]))],
    );
    match r.unwrap() {
        Negotiated::Export {
            name,
            export,
            structured,
        } => {
            assert_eq!(name, "disk");
            assert_eq!(export.size(), 100_000);
            assert!(!structured);
        }
        Negotiated::Aborted => panic!("aborted"),
    }
    let rep = replies(&out);
    assert_eq!(rep.len(), 3);
    let (opt, kind, d) = &rep[0];
    assert_eq!((*opt, *kind), (OPT_GO, REP_INFO));
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 100_000);
    let flags = u16::from_be_bytes([d[10], d[11]]);
    assert_eq!(flags & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
    let (_, kind, d) = &rep[1];
    assert_eq!(*kind, REP_INFO);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_BLOCK_SIZE);
    assert_eq!(u32::from_be_bytes(d[2..6].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_be_bytes(d[10..14].try_into().unwrap()),
        MAX_REQUEST_LEN
    );
    assert_eq!(rep[2].1, REP_ACK);
}

#[test]
fn list_info_unknown_options_then_abort() {
    let (r, out) = run(
        FIXED,
        &[
            option(OPT_LIST, &[]),
            option(OPT_LIST, b"x"),
            option(OPT_STRUCTURED_REPLY, b"x"),
            option(999, b"junk"),
            option(OPT_INFO, &go_data("nope", &[])),
            option(OPT_INFO, &go_data("other", &[])),
            option(OPT_GO, &[0, 0, 0, 50, b'a']), // name longer than the payload
            option(OPT_ABORT, &[]),
        ],
    );
    assert!(matches!(r.unwrap(), Negotiated::Aborted));
    let kinds: Vec<(u32, u32)> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        kinds,
        vec![
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_ACK),
            (OPT_LIST, REP_ERR_INVALID),
            (OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
            (999, REP_ERR_UNSUP),
            (OPT_INFO, REP_ERR_UNKNOWN),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_ACK),
            (OPT_GO, REP_ERR_INVALID),
            (OPT_ABORT, REP_ACK),
        ]
    );
    let names: Vec<Vec<u8>> = replies(&out)[..2]
        .iter()
        .map(|r| r.2[4..].to_vec())
        .collect();
    assert_eq!(names, vec![b"disk".to_vec(), b"other".to_vec()]);
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (flags, tail) in [(FIXED, 10), (FLAG_C_FIXED_NEWSTYLE, 134), (0, 134)] {
        let (r, out) = run(flags, &[option(OPT_EXPORT_NAME, b"other")]);
        assert!(matches!(r.unwrap(), Negotiated::Export { .. }));
        assert_eq!(out.len(), 18 + tail, "flags {flags}");
        assert_eq!(u64::from_be_bytes(out[18..26].try_into().unwrap()), 4096);
        assert!(out[28..].iter().all(|&b| b == 0));
    }
    let (r, _) = run(FIXED, &[option(OPT_EXPORT_NAME, b"missing")]);
    assert!(matches!(r, Err(NbdError::UnknownExport(n)) if n == "missing"));
}

#[test]
fn hostile_negotiations_end_cleanly() {
    // Unknown client flags.
    assert!(matches!(run(0x80, &[]).0, Err(NbdError::ClientFlags(0x80))));
    // Bad option magic.
    let mut bad = option(OPT_LIST, &[]);
    bad[0] ^= 1;
    assert!(matches!(
        run(FIXED, &[bad]).0,
        Err(NbdError::BadMagic { .. })
    ));
    // A 4 GiB option: refused with TOO_BIG before any allocation, then closed.
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    let (r, out) = run(FIXED, &[huge]);
    assert!(matches!(
        r,
        Err(NbdError::OptionTooLong { len: u32::MAX, .. })
    ));
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    // Truncated option data.
    let mut cut = option(OPT_GO, &go_data("disk", &[]));
    cut.truncate(cut.len() - 3);
    assert!(matches!(run(FIXED, &[cut]).0, Err(NbdError::Io(_))));
    // Options other than EXPORT_NAME without fixed newstyle.
    assert!(matches!(
        run(0, &[option(OPT_LIST, &[])]).0,
        Err(NbdError::Protocol(_))
    ));
    // Endless options.
    let many: Vec<Vec<u8>> = (0..=MAX_OPTIONS).map(|_| option(999, &[])).collect();
    assert!(matches!(run(FIXED, &many).0, Err(NbdError::TooManyOptions)));
    // Over-long name in GO: an error reply, the negotiation goes on.
    let long = "x".repeat(MAX_NAME_LEN as usize + 1);
    let (r, out) = run(FIXED, &[option(OPT_GO, &go_data(&long, &[]))]);
    assert!(matches!(r, Err(NbdError::Io(_))));
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m
}

/// A simple reply: (error, cookie, data).
type Simple = (u32, u64, Vec<u8>);

/// Runs a transmission phase over `input`; returns the result and the replies.
fn transmission(input: Vec<u8>) -> (Result<TransmitStats, NbdError>, Vec<Simple>) {
    let img = MemoryExport(image());
    let mut r = Cursor::new(input);
    let mut out = Vec::new();
    let res = transmit(&mut r, &mut out, &img, false, 0);
    (res, parse_simple(&out))
}

/// Splits simple replies; a reply with error 0 to a cookie >= 1000 carries cookie-1000
/// bytes of data (the tests encode the read length in the cookie).
fn parse_simple(out: &[u8]) -> Vec<Simple> {
    let mut v = Vec::new();
    let mut p = out;
    while !p.is_empty() {
        assert_eq!(&p[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(p[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(p[8..16].try_into().unwrap());
        let len = if err == 0 && cookie >= 1000 {
            (cookie - 1000) as usize
        } else {
            0
        };
        v.push((err, cookie, p[16..16 + len].to_vec()));
        p = &p[16 + len..];
    }
    v
}

#[test]
fn reads_and_refusals() {
    let img = image();
    let mut input = Vec::new();
    input.extend(request(CMD_READ, 1000 + 512, 4096, 512));
    input.extend(request(CMD_READ, 1, 99_999, 2)); // past the end
    input.extend(request(CMD_READ, 2, u64::MAX, 1)); // offset overflow
    input.extend(request(CMD_READ, 3, 0, 0)); // empty
    input.extend(request(CMD_WRITE, 4, 0, 5));
    input.extend(b"hello"); // the write's payload, consumed
    input.extend(request(CMD_TRIM, 5, 0, 4096));
    input.extend(request(CMD_WRITE_ZEROES, 6, 0, 4096));
    input.extend(request(CMD_FLUSH, 7, 0, 0));
    input.extend(request(42, 8, 0, 0));
    input.extend(request(CMD_READ, 1000 + 1, 99_999, 1)); // the last byte
    input.extend(request(CMD_DISC, 9, 0, 0));
    input.extend(request(CMD_READ, 10, 0, 1)); // after DISC: never answered
    let (r, rep) = transmission(input);
    let st = r.unwrap();
    assert!(st.disconnected);
    assert_eq!((st.reads, st.bytes_read), (2, 513));
    let errs: Vec<(u32, u64)> = rep.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        errs,
        vec![
            (0, 1512),
            (EINVAL, 1),
            (EINVAL, 2),
            (EINVAL, 3),
            (EPERM, 4),
            (EPERM, 5),
            (EPERM, 6),
            (0, 7),
            (EINVAL, 8),
            (0, 1001)
        ]
    );
    assert_eq!(rep[0].2, img[4096..4608]);
    assert_eq!(rep[9].2, img[99_999..]);
}

#[test]
fn hostile_requests_close_the_connection() {
    let mut bad = request(CMD_READ, 1, 0, 1);
    bad[3] ^= 0xff;
    assert!(matches!(
        transmission(bad).0,
        Err(NbdError::BadMagic { .. })
    ));
    let huge = request(CMD_WRITE, 1, 0, MAX_REQUEST_LEN + 1);
    assert!(matches!(
        transmission(huge).0,
        Err(NbdError::RequestTooLong(_))
    ));
    // A write whose payload never comes.
    let mut cut = request(CMD_WRITE, 1, 0, 100);
    cut.extend([0u8; 10]);
    assert!(matches!(transmission(cut).0, Err(NbdError::Io(_))));
    // An over-long read is refused but the connection stays.
    let mut input = request(CMD_READ, 1, 0, MAX_REQUEST_LEN + 1);
    input.extend(request(CMD_READ, 1000 + 3, 0, 3));
    let (r, rep) = transmission(input);
    assert!(!r.unwrap().disconnected);
    assert_eq!(rep[0].0, EINVAL);
    assert_eq!(rep[1].2, image()[..3]);
}

#[test]
fn structured_replies() {
    let (r, out) = run(
        FIXED,
        &[
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_GO, &go_data("disk", &[])),
        ],
    );
    assert!(matches!(
        r.unwrap(),
        Negotiated::Export {
            structured: true,
            ..
        }
    ));
    assert_eq!(replies(&out)[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));

    let img = image();
    let mut input = request(CMD_READ, 5, 99_990, 10);
    input.extend(request(CMD_READ, 6, 99_990, 11));
    input.extend(request(CMD_FLUSH, 7, 0, 0));
    let mut out = Vec::new();
    let st = transmit(
        &mut Cursor::new(input),
        &mut out,
        &MemoryExport(img.clone()),
        true,
        0,
    )
    .unwrap();
    assert_eq!(st.reads, 1);
    // (flags, type, cookie, payload) per chunk.
    let mut chunks = Vec::new();
    let mut p = &out[..];
    while !p.is_empty() {
        assert_eq!(&p[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(p[16..20].try_into().unwrap()) as usize;
        chunks.push((
            u16::from_be_bytes([p[4], p[5]]),
            u16::from_be_bytes([p[6], p[7]]),
            u64::from_be_bytes(p[8..16].try_into().unwrap()),
            p[20..20 + len].to_vec(),
        ));
        p = &p[20 + len..];
    }
    assert_eq!(chunks.len(), 3);
    let (flags, kind, cookie, payload) = &chunks[0];
    assert_eq!(
        (*flags, *kind, *cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 5)
    );
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 99_990);
    assert_eq!(payload[8..], img[99_990..]);
    let (flags, kind, cookie, payload) = &chunks[1];
    assert_eq!(
        (*flags, *kind, *cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)
    );
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    assert_eq!(chunks[2], (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, vec![]));
}

#[test]
fn concurrent_workers_answer_everything_by_cookie() {
    let img = image();
    let mut input = Vec::new();
    for i in 0..40u64 {
        input.extend(request(CMD_READ, 1000 + 700 + i, i * 2000, 700 + i as u32));
    }
    input.extend(request(CMD_READ, 1, 99_999, 2));
    input.extend(request(CMD_WRITE, 2, 0, 3));
    input.extend(b"abc");
    input.extend(request(CMD_DISC, 3, 0, 0));
    let mut out = Vec::new();
    let st = transmit(
        &mut Cursor::new(input),
        &mut out,
        &MemoryExport(img.clone()),
        false,
        4,
    )
    .unwrap();
    assert!(st.disconnected);
    assert_eq!((st.reads, st.errors), (40, 2));
    let mut rep = parse_simple(&out);
    rep.sort_by_key(|r| r.1);
    assert_eq!((rep[0].0, rep[0].1), (EINVAL, 1));
    assert_eq!((rep[1].0, rep[1].1), (EPERM, 2));
    for (i, r) in rep[2..].iter().enumerate() {
        let off = i * 2000;
        assert_eq!((r.0, r.1), (0, 1700 + i as u64));
        assert_eq!(r.2, img[off..off + 700 + i]);
    }
}

/// An export whose read at offset 0 waits until a read elsewhere has finished.
struct SlowStart {
    data: Vec<u8>,
    other_done: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
}

impl Export for SlowStart {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut done = self.other_done.lock();
        if offset == 0 {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !*done {
                if self.cv.wait_until(&mut done, deadline).timed_out() {
                    return Err("the other read never ran".into());
                }
            }
        } else {
            *done = true;
            self.cv.notify_all();
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
}

#[test]
fn a_slow_read_does_not_hold_up_the_next() {
    let ex = SlowStart {
        data: image(),
        other_done: parking_lot::Mutex::new(false),
        cv: parking_lot::Condvar::new(),
    };
    let mut input = request(CMD_READ, 1000 + 10, 0, 10);
    input.extend(request(CMD_READ, 1000 + 20, 4096, 20));
    let mut out = Vec::new();
    let st = transmit(&mut Cursor::new(input), &mut out, &ex, false, 2).unwrap();
    assert_eq!(st.reads, 2);
    // The first read waits until the second read has run: it succeeding at all proves the
    // second was not held up behind it (its reply may still be written first or second).
    let mut rep = parse_simple(&out);
    rep.sort_by_key(|r| r.1);
    assert_eq!((rep[0].0, rep[0].1), (0, 1010));
    assert_eq!(rep[0].2, ex.data[..10]);
    assert_eq!((rep[1].0, rep[1].1), (0, 1020));
    assert_eq!(rep[1].2, ex.data[4096..4116]);
}

/// Input that arrives in pieces with a read timeout (`WouldBlock`) between them, then
/// times out forever: what a socket with a read timeout does.
struct Stalling {
    pieces: std::collections::VecDeque<Vec<u8>>,
    stall_next: bool,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let stall = self.stall_next;
        self.stall_next = !stall;
        if stall {
            std::thread::sleep(std::time::Duration::from_millis(5));
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.pieces.pop_front() {
            Some(p) => {
                buf[..p.len()].copy_from_slice(&p);
                Ok(p.len())
            }
            None => {
                std::thread::sleep(std::time::Duration::from_millis(5));
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }
}

#[test]
fn a_request_split_by_read_timeouts_is_resumed_and_an_idle_client_is_dropped() {
    let ex = MemoryExport(image());
    let req = request(CMD_READ, 1050, 100, 50);
    let pieces = [&req[..3], &req[3..20], &req[20..]]
        .iter()
        .map(|p| p.to_vec())
        .collect();
    let mut input = Stalling {
        pieces,
        stall_next: true,
    };
    let budget = Arc::new(ReplyBudget::new(1 << 20));
    let opts = TransmitOptions {
        workers: 1,
        budget: Some(ConnectionBudget::new(budget.clone(), 1 << 20)),
        idle_timeout: Some(std::time::Duration::from_millis(200)),
        reply_timeout: None,
    };
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let err = transmit_with(&mut input, &mut out, &ex, false, &opts).unwrap_err();
    assert!(matches!(err, NbdError::Idle(_)), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let rep = parse_simple(&out);
    assert_eq!(rep.len(), 1);
    assert_eq!((rep[0].0, rep[0].1), (0, 1050));
    assert_eq!(rep[0].2, image()[100..150]);
    assert_eq!(budget.used(), 0, "every share given back");
}
