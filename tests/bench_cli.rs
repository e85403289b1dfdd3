//! `streamboot bench` on the real binary: a small image behind a real nginx, the built-in
//! guest (libblkio's vhost-user-blk client), a loopback and a 20 ms RTT profile through the
//! bench's proxy. Checks the JSON facts against nginx's own access log, and that the report
//! is well-formed XHTML with a comparison table and a timeline path per run.
#![cfg(feature = "demo-blkio")]

mod common;

use std::process::{Command, Output};

use common::nginx::Nginx;
use serde_json::Value;

const IMAGE: usize = 8 << 20;
const READS: u64 = 100;
const BLOCK: u64 = 4096;

/// Random bytes with an MBR whose one partition spans the image after the first MiB (as a
/// real disk image has): prepare checks that the partition table fits the disk.
fn partitioned_image(seed: u64) -> Vec<u8> {
    let mut img = common::random_bytes(seed, IMAGE);
    let entry = &mut img[446..462];
    entry.fill(0);
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&((IMAGE / 512) as u32 - 2048).to_le_bytes());
    img[462..510].fill(0);
    img[510] = 0x55;
    img[511] = 0xaa;
    img
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--json", "bench"])
        .args(args)
        .output()
        .expect("run streamboot bench")
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn loopback_and_rtt_profiles_agree_with_the_origin_and_draw_a_report() {
    let nginx = Nginx::start();
    nginx.put("t.img", &partitioned_image(17));
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("report.html");
    let out_file = dir.path().join("results.json");
    let work = dir.path().join("work");
    let url = nginx.url("t.img");
    let out = bench(&[
        "--target",
        &url,
        "--network",
        "loopback",
        "--network",
        "rtt=20ms",
        "--strategy",
        "cold,hydrate",
        "--count",
        &READS.to_string(),
        "--report",
        report.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
        "--work",
        work.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stdout}\n{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let runs: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "run").collect();
    let summaries = lines.iter().filter(|v| v["kind"] == "summary").count();
    assert_eq!((runs.len(), summaries), (4, 4), "{stdout}");
    // Progress went to stderr, one line per run at least.
    assert!(stderr.contains("[4/4]"), "{stderr}");

    // What the origin sent, by its own log, is what the runs say came through the proxy:
    // prepare's and serve's bytes and requests of every run.
    let log = nginx.access_log();
    let wire: u64 = runs
        .iter()
        .map(|r| u(r, "prepare_origin_wire_bytes") + u(r, "origin_wire_bytes"))
        .sum();
    let requests: u64 = runs
        .iter()
        .map(|r| u(r, "prepare_origin_requests") + u(r, "origin_requests"))
        .sum();
    assert_eq!(wire, nginx.bytes_sent_total(), "origin bytes");
    assert_eq!(requests, log.len() as u64, "origin requests");

    for r in &runs {
        // Serve's fetched bytes (control API) are the image bytes the proxy delivered.
        assert_eq!(u(r, "bytes_fetched"), u(r, "proxy_bytes_fetched"), "{r}");
        assert_eq!(r["fetch_counts_agree"], true, "{r}");
        assert_eq!(
            u(r, "bytes_fetched"),
            u(r, "bytes_fetched_demand") + u(r, "bytes_fetched_background")
        );
        assert_eq!(u(r, "ops"), READS, "{r}");
        assert_eq!(u(r, "bytes_read"), READS * BLOCK, "{r}");
        assert!(u(r, "bytes_fetched") > 0, "{r}");
        let ampl = f(r, "read_amplification");
        let expect = u(r, "bytes_fetched") as f64 / (READS * BLOCK) as f64;
        assert!((ampl - expect).abs() < 1e-9, "{r}");
        let lat = &r["latency_ms"];
        assert!(f(lat, "p50") <= f(lat, "p90") && f(lat, "p90") <= f(lat, "p99"));
        assert!(f(lat, "p99") <= f(lat, "max"), "{r}");
        assert!(
            f(r, "time_to_first_read_ms") <= f(r, "time_to_finish_ms"),
            "{r}"
        );
        assert!(u(&r["machine"], "cores") >= 1, "{r}");
    }
    let by = |name: &str| {
        *runs
            .iter()
            .find(|r| r["run"] == name)
            .unwrap_or_else(|| panic!("no run {name}: {stdout}"))
    };
    let (cold_lo, cold_rtt) = (by("cold/64K/loopback"), by("cold/64K/rtt=20ms"));
    // The same offsets (same seed) fetch the same chunks whatever the network.
    assert_eq!(u(cold_lo, "bytes_fetched"), u(cold_rtt, "bytes_fetched"));
    assert_eq!(u(cold_lo, "bytes_fetched_background"), 0);
    // Some reads needed a fetch, and every fetch crosses the emulated link (the first
    // fetched read against serve's start: rtt_profile_delays_the_first_fetched_read_by_an_rtt).
    assert!(f(&cold_rtt["latency_ms"], "max") >= 20.0, "{cold_rtt}");

    // --out: the same runs, the machine and the summary.
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).expect("--out written"))
            .expect("--out is JSON");
    assert_eq!(doc["runs"].as_array().map(Vec::len), Some(4));
    assert_eq!(doc["summary"].as_array().map(Vec::len), Some(4));
    assert!(doc["machine"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));

    // The report: well-formed XML, the comparison table (a row per run) and a timeline
    // path for every run in each chart.
    let html = std::fs::read_to_string(&report).expect("report written");
    let xml = roxmltree::Document::parse(&html).expect("report is well-formed XML");
    let table = xml
        .descendants()
        .find(|n| n.has_tag_name("table") && n.attribute("id") == Some("comparison"))
        .expect("comparison table");
    let rows = table
        .descendants()
        .filter(|n| n.has_tag_name("tr") && n.parent().is_some_and(|p| p.has_tag_name("tbody")))
        .count();
    assert_eq!(rows, 4);
    let svgs: Vec<_> = xml
        .descendants()
        .filter(|n| n.has_tag_name("svg"))
        .collect();
    assert_eq!(svgs.len(), 2, "two timelines");
    for svg in svgs {
        for r in &runs {
            let name = format!("{} #1", r["run"].as_str().unwrap());
            let path = svg
                .descendants()
                .find(|n| {
                    n.has_tag_name("path")
                        && n.attribute("class") == Some("timeline")
                        && n.attribute("data-run") == Some(name.as_str())
                })
                .unwrap_or_else(|| panic!("no timeline for {name}"));
            assert!(path.attribute("d").is_some_and(|d| d.starts_with('M')));
        }
    }
}

#[test]
fn bad_options_are_one_line_usage_errors_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    for args in [
        vec!["--target", "https://127.0.0.1:1/t.img"],
        vec![
            "--target",
            "http://127.0.0.1:1/t.img",
            "--network",
            "rtt=soon",
        ],
        vec![
            "--target",
            "http://127.0.0.1:1/t.img",
            "--network",
            "loss=1%",
        ],
        vec![
            "--target",
            "http://127.0.0.1:1/t.img",
            "--block-size",
            "1000",
        ],
        vec![
            "--target",
            "http://127.0.0.1:1/t.img",
            "--workload",
            "replay",
        ],
        vec!["--target", "http://127.0.0.1:1/t.img", "--queue-depth", "0"],
        vec![
            "--target",
            "http://127.0.0.1:1/t.img",
            "--strategy",
            "staged",
        ],
    ] {
        let mut a = args.clone();
        a.extend(["--work", work.to_str().unwrap()]);
        let out = bench(&a);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("--json error line");
        assert_eq!(v["kind"], "usage", "{args:?}");
        assert!(!work.exists(), "{args:?} created the work directory");
    }
    // A --work directory that holds something is refused, and left as it was.
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(work.join("run-0-r1")).unwrap();
    std::fs::write(work.join("run-0-r1/keep"), b"mine").unwrap();
    let out = bench(&[
        "--target",
        "http://127.0.0.1:1/t.img",
        "--work",
        work.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(work.join("run-0-r1/keep")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
}

#[test]
fn an_unreachable_origin_is_a_network_error_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    let url = format!("http://127.0.0.1:{}/t.img", common::dead_port());
    let out = bench(&["--target", &url, "--work", work.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = stderr
        .lines()
        .find(|l| l.starts_with("streamboot: error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("cannot connect to the origin"), "{line}");
    assert_eq!(out.status.code(), Some(5), "network error: {stderr}");
    assert!(!work.exists());
}

/// A replayed boot profile whose first chunk is not home: the cold run's first read is a
/// fetch, so under a 20 ms RTT it completes at least one RTT after serve was ready, and
/// takes at least one RTT itself.
#[test]
fn rtt_profile_delays_the_first_fetched_read_by_an_rtt() {
    let nginx = Nginx::start();
    nginx.put("t.img", &common::random_bytes(18, IMAGE));
    let dir = tempfile::tempdir().expect("tempdir");
    // prepare's boot set is 0..1M (chunks 0..16 of 64K): chunks 100, 50, 120 are missing.
    let profile = dir.path().join("boot.json");
    let chunks = [100u64, 50, 120];
    let p = serde_json::json!({"format": "streamboot-boot-profile", "version": 1,
        "chunk_size": 65536, "target_size": IMAGE, "target_validator": "", "chunks": chunks});
    std::fs::write(&profile, p.to_string()).unwrap();
    let url = nginx.url("t.img");
    let out = bench(&[
        "--target",
        &url,
        "--workload",
        "replay",
        "--profile",
        profile.to_str().unwrap(),
        "--queue-depth",
        "1",
        "--network",
        "loopback;rtt=20ms",
        "--strategy",
        "cold,staged",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "run")
        .collect();
    assert_eq!(runs.len(), 4, "{stdout}");
    for r in &runs {
        // Each chunk read whole, in 4K reads; each fetched once (cold), or staged home by
        // prepare (staged: nothing left to fetch while serving).
        assert_eq!(u(r, "ops"), chunks.len() as u64 * 16, "{r}");
        assert_eq!(u(r, "bytes_read"), chunks.len() as u64 * 65536, "{r}");
        let expect = match r["strategy"].as_str() {
            Some("cold") => chunks.len() as u64 * 65536,
            _ => 0,
        };
        assert_eq!(u(r, "bytes_fetched"), expect, "{r}");
        assert_eq!(u(r, "proxy_bytes_fetched"), u(r, "bytes_fetched"), "{r}");
    }
    let staged = runs.iter().find(|r| r["strategy"] == "staged").unwrap();
    assert!(
        u(staged, "prepare_origin_wire_bytes") > chunks.len() as u64 * 65536,
        "prepare fetched the profile's chunks: {staged}"
    );
    let rtt = runs
        .iter()
        .find(|r| r["network"] == "rtt=20ms" && r["strategy"] == "cold")
        .unwrap();
    assert!(f(rtt, "first_read_latency_ms") >= 20.0, "{rtt}");
    assert!(
        f(rtt, "time_to_first_read_ms") >= f(rtt, "serve_ready_ms") + 20.0,
        "{rtt}"
    );
}
