//! `streamboot serve` end to end: the real binary streams a target from a real nginx,
//! and libblkio (an independent vhost-user-blk client) reads and writes it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

use common::blkio_client::Client;
use common::disk::{cli_ok, sha256, sha256_file};
use common::nginx::Nginx;
use common::serve::Served;

/// Reads the whole device with `queues` queues and `depth` requests in flight each.
fn read_all(sock: &Path, queues: usize, depth: usize, req: usize) -> Vec<u8> {
    let mut c = Client::connect(sock, queues as i32, queues * depth * req).unwrap();
    let cap = c.capacity as usize;
    let mut out = vec![0u8; cap];
    let mut next = 0usize;
    let mut inflight: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); queues]; // (tag=slot, offset, len)
    loop {
        for (q, fl) in inflight.iter_mut().enumerate() {
            while fl.len() < depth && next < cap {
                let len = req.min(cap - next);
                let slot = (0..depth).find(|s| !fl.iter().any(|x| x.0 == *s)).unwrap();
                c.submit_read(q, next as u64, (q * depth + slot) * req, len, slot);
                fl.push((slot, next, len));
                next += len;
            }
        }
        if inflight.iter().all(|v| v.is_empty()) {
            break;
        }
        for (q, fl) in inflight.iter_mut().enumerate() {
            if fl.is_empty() {
                continue;
            }
            for d in c.wait(q, 1).unwrap() {
                assert_eq!(d.ret, 0, "read failed");
                let i = fl.iter().position(|x| x.0 == d.user_data).unwrap();
                let (slot, off, len) = fl.remove(i);
                let from = (q * depth + slot) * req;
                out[off..off + len].copy_from_slice(c.buf(from..from + len));
            }
        }
    }
    out
}

/// Images are sector multiples (virtio capacity counts 512-byte sectors) but not chunk
/// multiples.
fn setup(
    nginx: &Nginx,
    name: &str,
    s: usize,
    t: usize,
    seed: u64,
    prepare_args: &[&str],
) -> (tempfile::TempDir, PathBuf, Vec<u8>, Vec<u8>) {
    let source = common::random_bytes(seed, s);
    let mut target = common::random_bytes(seed + 1, t);
    target[t / 2..t / 2 + 500_000].fill(0);
    nginx.put(name, &target);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("disk.img");
    std::fs::write(&d, &source).unwrap();
    let url = nginx.url(name);
    let mut args = vec!["prepare", d.to_str().unwrap(), "--target", &url];
    args.extend_from_slice(prepare_args);
    cli_ok(&args);
    (dir, d, source, target)
}

#[test]
fn whole_device_streams_equal_to_target() {
    let nginx = Nginx::start();
    for (i, (queues, hydrate)) in [(1usize, false), (4, false), (4, true)]
        .into_iter()
        .enumerate()
    {
        let (dir, d, _, target) = setup(
            &nginx,
            &format!("s{i}.img"),
            6_000_000,
            9_437_184 + 512 * i,
            10 + i as u64,
            &[],
        );
        let sock = dir.path().join("vu.sock");
        let q = queues.to_string();
        let mut extra = vec!["--queues", q.as_str()];
        if !hydrate {
            extra.push("--no-hydrate");
        }
        let srv = Served::start(&d, &sock, &extra);
        let all = read_all(&sock, queues, 8, 128 << 10);
        assert_eq!(all.len(), target.len(), "capacity != target size");
        assert_eq!(
            sha256(&all),
            sha256(&target),
            "queues {queues} hydrate {hydrate}: device != target"
        );
        srv.stop();
    }
}

#[test]
fn flushed_writes_survive_backend_crash_restart_and_reconnect() {
    let nginx = Nginx::start();
    let (dir, d, _, target) = setup(
        &nginx,
        "w.img",
        3_000_000,
        4_000_256,
        30,
        &["--chunk-size", "16K"],
    );
    // Confirmed: the many connections below are not trial boots.
    cli_ok(&["confirm", d.to_str().unwrap()]);
    let sock = dir.path().join("vu.sock");
    let mut model = target.clone();
    let mut rng = common::test_rng(31);
    let srv = Served::start(&d, &sock, &["--no-hydrate"]);
    {
        let mut c = Client::connect(&sock, 1, 1 << 20).unwrap();
        for _ in 0..50 {
            let off = rng.random_range(0..(target.len() - 70_000) / 512) * 512;
            let len = rng.random_range(1..128) * 512;
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            c.buf(0..len).copy_from_slice(&data);
            assert_eq!(c.write(off as u64, 0, len), 0);
            model[off..off + len].copy_from_slice(&data);
        }
        assert_eq!(c.flush(), 0);
    }
    // A crash (no shutdown flush) after the flush: everything flushed is there.
    srv.kill9();
    let srv = Served::start(&d, &sock, &["--no-hydrate", "--queues", "2"]);
    assert!(
        read_all(&sock, 2, 4, 64 << 10) == model,
        "flushed writes lost across a backend crash"
    );
    // A client reconnect to the same backend sees them too; then a clean restart.
    assert!(
        read_all(&sock, 1, 2, 256 << 10) == model,
        "reconnect lost data"
    );
    srv.stop();
    let srv = Served::start(&d, &sock, &["--queues", "4"]);
    let all = read_all(&sock, 4, 8, 128 << 10);
    if all != model {
        let bad: Vec<usize> = (0..model.len())
            .step_by(512)
            .filter(|&i| all[i..i + 512] != model[i..i + 512])
            .collect();
        let tgt: usize = bad
            .iter()
            .filter(|&&i| all[i..i + 512] == target[i..i + 512])
            .count();
        panic!("after restart with hydration: {} sectors differ (first {:?}), {tgt} of them hold the unwritten target", bad.len(), &bad[..bad.len().min(8)]);
    }
    srv.stop();
    // Commit offline; the disk file is target + writes.
    cli_ok(&["commit", d.to_str().unwrap(), "--force"]);
    assert_eq!(sha256_file(&d), sha256(&model));
}

#[test]
fn trial_start_limit_falls_back_to_source() {
    let nginx = Nginx::start();
    let (dir, d, source, target) = setup(
        &nginx,
        "f.img",
        2_000_384,
        2_500_096,
        40,
        &["--max-trial-starts", "2"],
    );
    let sock = dir.path().join("vu.sock");
    let srv = Served::start(&d, &sock, &["--no-hydrate"]);
    for boot in 1..=2 {
        let all = read_all(&sock, 1, 4, 64 << 10);
        assert!(all == target, "trial boot {boot} did not see the target");
    }
    // Two unconfirmed trial boots used the starts up: the next fresh device start falls
    // back, and its own reads already see the source (the capacity it read at connect
    // is the target's: a VMM is told of the change by a config-change message, this
    // client learns it when it connects again).
    {
        let mut c = Client::connect(&sock, 1, 1 << 20).unwrap();
        assert_eq!(c.read(0, 0, 1 << 20), 0);
        assert!(
            c.buf(0..1 << 20) == &source[..1 << 20],
            "the fresh start at the limit did not fall back"
        );
    }
    let all = read_all(&sock, 1, 4, 64 << 10);
    assert_eq!(
        all.len(),
        source.len(),
        "fallback did not switch to the source's size"
    );
    assert!(all == source, "fallback did not serve the source");
    srv.stop();
    assert_eq!(
        sha256_file(&d),
        sha256(&source),
        "disk is not the source after fallback"
    );
}

#[test]
fn confirm_offline_is_refused_while_serving() {
    let nginx = Nginx::start();
    let (dir, d, _, _) = setup(&nginx, "c.img", 1_000_000, 1_200_000, 50, &[]);
    let sock = dir.path().join("vu.sock");
    let srv = Served::start(&d, &sock, &["--no-hydrate"]);
    let err = common::disk::cli_err(&["confirm", d.to_str().unwrap()]);
    assert!(
        err.contains("in use by another streamboot process"),
        "{err}"
    );
    srv.stop();
    cli_ok(&["confirm", d.to_str().unwrap()]);
}

fn control_state(ctl: &Path) -> String {
    let v = streamboot::control::client::get_status(ctl).expect("status");
    v["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn commit_through_control_while_client_reads_and_writes() {
    let nginx = Nginx::start();
    let (dir, d, _, target) = setup(
        &nginx,
        "k.img",
        4_000_256,
        12_582_912,
        60,
        &["--chunk-size", "64K"],
    );
    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let srv = Served::start(
        &d,
        &sock,
        &[
            "--no-hydrate",
            "--control",
            ctl.to_str().unwrap(),
            "--queues",
            "2",
        ],
    );
    assert_eq!(control_state(&ctl), "prepared");
    let msg = streamboot::control::client::confirm(&ctl).unwrap();
    assert!(msg.contains("confirmed"), "{msg}");
    let metrics = streamboot::control::client::get_metrics(&ctl).unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("streamboot_state{")
            && l.contains("state=\"confirmed\"")
            && l.ends_with(" 1.0")),
        "{metrics}"
    );

    let mut model = target.clone();
    let mut rng = common::test_rng(61);
    let mut c = Client::connect(&sock, 2, 4 << 20).unwrap();
    let mut committed_at = None;
    for i in 0..4000 {
        if i == 20 {
            let m = streamboot::control::client::commit(&ctl).unwrap();
            assert!(m.contains("commit"), "{m}");
            let st = control_state(&ctl);
            assert!(
                st == "committing" || st == "committed",
                "state right after commit: {st}"
            );
        }
        let off = rng.random_range(0..(model.len() - (1 << 20)) / 512) * 512;
        let len = rng.random_range(1..=2048) * 512;
        if rng.random_bool(0.4) {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            c.buf(0..len).copy_from_slice(&data);
            assert_eq!(c.write(off as u64, 0, len), 0);
            model[off..off + len].copy_from_slice(&data);
        } else {
            assert_eq!(c.read(off as u64, 0, len), 0);
            assert!(
                c.buf(0..len) == &model[off..off + len],
                "read during commit differs at {off}+{len}"
            );
        }
        if i > 20 && i % 50 == 0 && control_state(&ctl) == "committed" {
            committed_at = Some(i);
            if i > 200 {
                break;
            }
        }
    }
    assert!(
        committed_at.is_some(),
        "commit did not finish while the client ran"
    );
    assert_eq!(c.flush(), 0);
    drop(c);
    srv.stop();
    let disk = std::fs::read(&d).unwrap();
    assert_eq!(disk.len(), model.len(), "area not removed");
    assert!(disk == model, "committed disk != target + writes");
}

#[test]
fn rollback_through_control_only_without_vm() {
    let nginx = Nginx::start();
    let (dir, d, source, _) = setup(&nginx, "r.img", 3_000_320, 2_000_384, 70, &[]);
    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let srv = Served::start(&d, &sock, &["--control", ctl.to_str().unwrap()]);
    {
        let _c = Client::connect(&sock, 1, 1 << 20).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let e = streamboot::control::client::rollback(&ctl).unwrap_err();
        assert!(e.is_conflict(), "rollback with a VM connected: {e}");
    }
    let t = Instant::now();
    loop {
        match streamboot::control::client::rollback(&ctl) {
            Ok(m) => {
                assert!(m.contains("source"), "{m}");
                break;
            }
            Err(e) if e.is_conflict() && t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("rollback: {e}"),
        }
    }
    // Nothing can bring the target back: confirm and commit are refused.
    assert!(streamboot::control::client::confirm(&ctl)
        .unwrap_err()
        .is_conflict());
    assert!(streamboot::control::client::commit(&ctl)
        .unwrap_err()
        .is_conflict());
    // The next VM gets the source.
    let all = read_all(&sock, 1, 4, 64 << 10);
    assert!(
        all[..] == source[..],
        "after rollback the device is not the source"
    );
    srv.stop();
    assert_eq!(sha256_file(&d), sha256(&source));
    // The CLI falls back to acting on the disk when nothing listens on --control.
    let out = cli_ok(&[
        "--json",
        "status",
        d.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
    ]);
    assert!(out.contains("\"prepared\":false"), "{out}");
}

/// SIGTERM ends serve promptly even while rate-limited hydration runs, and even when the
/// server went away with a hydration fetch retrying in flight (regressions: the hydrator
/// slept in the rate limiter ignoring stop; shutdown joined a fetch that retries forever).
#[test]
fn sigterm_is_prompt_with_throttled_hydration_and_dead_server() {
    for kill_server in [false, true] {
        let mut nginx = Nginx::start();
        let (dir, d, _, _) = setup(&nginx, "h.img", 2_000_384, 16_777_216, 80, &[]);
        let sock = dir.path().join("vu.sock");
        let mut srv = Served::start(&d, &sock, &["--rate", "1M"]);
        std::thread::sleep(Duration::from_millis(1500));
        if kill_server {
            nginx.stop();
            std::thread::sleep(Duration::from_millis(1000));
        }
        let mut c = srv.child.take().unwrap();
        // SAFETY: sending a signal to our own child process by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        let st = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!("serve ignored SIGTERM for 20 s (server down: {kill_server})");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            st.success(),
            "serve exit status {st:?} (server down: {kill_server})"
        );
        // Whatever was hydrated is consistent: status reads the disk cleanly.
        cli_ok(&["status", d.to_str().unwrap()]);
    }
}
