//! Hostile NBD peers against the real `streamboot export`, over real sockets: a client
//! that floods large reads and never reads the replies keeps the server's memory within
//! the reply budget while others are served; an idle client is disconnected after the
//! idle timeout; a slow-loris handshake is cut at the whole-handshake deadline; error
//! replies do not carry host paths.

mod common;
mod nbd_common;
mod store_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nbd_common::*;
use store_common::{CS, MIB};

/// VmRSS of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A store with one 40 MiB image `big` (random: every chunk stored), signed.
fn big_store(dir: &std::path::Path) -> Vec<u8> {
    let img = common::random_bytes(9, 40 * MIB);
    std::fs::write(dir.join("big.img"), &img).unwrap();
    let d = dir.to_str().unwrap();
    run_ok(&["keygen", &format!("{d}/key")]);
    run_ok(&[
        "publish",
        &format!("{d}/big.img"),
        "--store",
        &format!("{d}/store"),
        "--name",
        "big",
        "--key",
        &format!("{d}/key.key"),
    ]);
    img
}

fn export(d: &str, extra: &[&str]) -> Export {
    let mut args = vec![
        "--store".to_string(),
        format!("{d}/store"),
        "--trusted-key".into(),
        format!("{d}/key.pub"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Export::start(&a).unwrap()
}

/// True when the server has closed `s` (EOF or reset), false if still open after `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while t.elapsed() < wait {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("{e}"),
        }
    }
    false
}

#[test]
fn flooding_reads_without_reading_replies_stays_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let img = big_store(dir.path());
    let d = dir.path().to_str().unwrap();
    let budget = 128 * MIB as u64;
    let ex = export(d, &["--reply-budget", "128M", "--memory-cache-size", "16M"]);
    let pid = ex.child.id();
    let base = rss(pid);

    // Three hostile connections, each asking for 16 reads of 32 MiB and reading nothing.
    let mut hostile = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(ex.port);
        assert_eq!(c.go("big"), Ok(img.len() as u64));
        for i in 0..16u64 {
            c.request(0, i, (i % 8) * MIB as u64, 32 * MIB as u32);
        }
        hostile.push(c);
    }
    // Another client is served meanwhile, with the right bytes.
    let mut good = Client::connect(ex.port);
    assert_eq!(good.go("big"), Ok(img.len() as u64));
    let mut peak = 0;
    for i in 0..40usize {
        let off = (i * 7919 * 4096) % (img.len() - CS);
        assert_eq!(
            good.read(off as u64, CS as u32).unwrap(),
            img[off..off + CS]
        );
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Memory, sampled while the hostile clients hold what they can.
    for _ in 0..20 {
        peak = peak.max(rss(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let bound = budget + 150 * MIB as u64;
    assert!(
        peak < bound,
        "export RSS peaked at {} MiB (start {} MiB, bound {} MiB)",
        peak >> 20,
        base >> 20,
        bound >> 20
    );
    good.disconnect();
    drop(hostile);
    ex.stop();
}

#[test]
fn an_idle_client_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = export(d, &["--idle-timeout", "2s"]);
    let mut idle = Client::connect(ex.port);
    assert_eq!(idle.go("a"), Ok(a.len() as u64));
    assert_eq!(idle.read(0, 512).unwrap(), a[..512]);
    // A busy client is not idle: requests every second for longer than the timeout.
    let mut busy = Client::connect(ex.port);
    assert_eq!(busy.go("a"), Ok(a.len() as u64));
    for i in 0..4u64 {
        assert_eq!(
            busy.read(i * 4096, 4096).unwrap(),
            a[i as usize * 4096..][..4096]
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        closed_within(&mut idle.s, Duration::from_secs(30)),
        "idle client still connected"
    );
    assert_eq!(busy.read(8192, 100).unwrap(), a[8192..8292]);
    busy.disconnect();
    ex.stop();
}

#[test]
fn a_slow_loris_handshake_is_cut_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = export(d, &["--handshake-timeout", "3s"]);
    let mut s = TcpStream::connect(("127.0.0.1", ex.port)).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    // An option header, one byte every 300 ms: each read is quick, the whole is not.
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend(3u32.to_be_bytes());
    opt.extend(0u32.to_be_bytes());
    let started = Instant::now();
    let mut cut = false;
    'outer: for _ in 0..100 {
        for &b in &opt {
            if s.write_all(&[b]).is_err() || closed_within(&mut s, Duration::from_millis(300)) {
                cut = true;
                break 'outer;
            }
            if started.elapsed() > Duration::from_secs(25) {
                break 'outer;
            }
        }
    }
    assert!(
        cut,
        "slow handshake still open after {:?}",
        started.elapsed()
    );
    // A normal client is served right after.
    let mut c = Client::connect(ex.port);
    assert_eq!(c.list(), vec!["a".to_string(), "b".to_string()]);
    ex.stop();
}

#[test]
fn error_replies_do_not_reveal_host_paths() {
    let dir = tempfile::tempdir().unwrap();
    publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = export(d, &[]);
    // An image published after the start, signed by a key the export does not trust.
    run_ok(&["keygen", &format!("{d}/other")]);
    run_ok(&[
        "publish",
        &format!("{d}/a.img"),
        "--store",
        &format!("{d}/store"),
        "--name",
        "evil",
        "--key",
        &format!("{d}/other.key"),
    ]);
    let mut c = Client::connect(ex.port);
    let mut req = 4u32.to_be_bytes().to_vec();
    req.extend(b"evil");
    req.extend(0u16.to_be_bytes());
    c.option(6, &req); // NBD_OPT_INFO
    let (kind, msg) = c.reply();
    let msg = String::from_utf8_lossy(&msg).to_string();
    assert_eq!(kind, 0x8000_0006, "{msg}");
    assert!(
        !msg.contains(d) && !msg.contains("/tmp"),
        "path sent to the peer: {msg}"
    );
    assert!(msg.contains("not available"), "{msg}");
    // The connection is still usable.
    assert_eq!(c.list().len(), 3);
    ex.stop();
}

#[test]
fn a_client_taking_replies_a_byte_at_a_time_is_cut_at_the_reply_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let img = big_store(dir.path());
    let d = dir.path().to_str().unwrap();
    let ex = export(d, &["--reply-timeout", "3s", "--reply-budget", "64M"]);
    let mut c = Client::connect(ex.port);
    assert_eq!(c.go("big"), Ok(img.len() as u64));
    // Shrink our receive buffer so the kernel cannot take the whole reply for us.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&c.s);
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on our own open socket with a valid int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    c.request(0, 1, 0, 32 * MIB as u32);
    let started = Instant::now();
    let mut got = 0usize;
    let mut b = [0u8; 64];
    let cut = loop {
        match c.s.read(&mut b) {
            Ok(0) => break true,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("{e}"),
        }
        if started.elapsed() > Duration::from_secs(40) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        cut,
        "a drip reader kept its reply for {:?}",
        started.elapsed()
    );
    assert!(got < 32 * MIB, "the whole reply was taken");
    ex.stop();
}
