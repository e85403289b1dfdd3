//! `streamboot demo --no-vm`: the real binary runs the whole flow (built-in HTTP server,
//! prepare, serve, a blkio client as the guest, confirm, commit) and its JSON summary
//! states facts that must hold together.

use std::process::Command;

use serde_json::Value;

fn run_demo(args: &[&str]) -> (std::process::Output, Value) {
    let cache = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--json", "demo", "--no-vm"])
        .args(args)
        .env("XDG_CACHE_HOME", cache.path())
        .output()
        .expect("run streamboot demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("").to_string();
    let v: Value = serde_json::from_str(&last).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, v)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn demo_no_vm_streams_commits_and_verifies() {
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path().join("w");
    let (out, v) = run_demo(&["--synthetic", "--work", w.to_str().unwrap()]);
    assert!(out.status.success(), "exit {:?}: {v}", out.status);
    assert_eq!(v["ok"], true, "{v}");
    let s = &v["summary"];
    assert_eq!(s["guest"], "blkio");
    assert_eq!(s["images"], "synthetic");
    assert_eq!(s["guest_verified"], true);
    assert_eq!(s["final_disk_verified"], true);
    assert!(s["plain_boot"].is_null());

    // Every byte the HTTP server sent while serving is one the engine counted as fetched
    // (on demand or in the background), plus the one-byte probe of each source open.
    let wire = &s["wire_serve"];
    let (demand, background) = (
        u(s, "bytes_fetched_demand"),
        u(s, "bytes_fetched_background"),
    );
    assert_eq!(
        demand + background + u(wire, "probes"),
        u(wire, "bytes"),
        "{s}"
    );
    // The guest read the whole device while the background rate was limited: most of it
    // came on demand, and prepare had fetched the boot chunks (the first MiB) before.
    assert!(demand > 0, "{s}");
    let (v2, chunk) = (u(s, "v2_size"), u(s, "chunk_size"));
    assert!(u(&s["wire_prepare"], "bytes") >= 1 << 20, "{s}");
    // Fetched while serving = all of v2 except what prepare placed home (whole chunks).
    let home = v2 - (demand + background);
    assert_eq!(home % chunk, 0, "{s}");
    assert!((1 << 20..v2).contains(&home), "{s}");
    assert!(
        s["first_read_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{s}"
    );
    assert!(u(s, "v2_size") > u(s, "v1_size"));

    // --work is kept, holding the committed disk: v2's size, and no streamboot metadata
    // left (status says plain).
    let disk = w.join("disk.img");
    assert_eq!(std::fs::metadata(&disk).expect("disk kept").len(), v2);
    let st = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--json", "status"])
        .arg(&disk)
        .output()
        .expect("status");
    let st: Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(st["prepared"], false, "{st}");
}

#[test]
fn demo_refuses_a_work_path_that_is_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("file");
    std::fs::write(&f, b"not a directory").unwrap();
    let (out, v) = run_demo(&["--synthetic", "--work", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["ok"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("exists and is not a directory"),
        "{v}"
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"not a directory");
}
