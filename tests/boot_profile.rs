//! Boot profiles end to end: `serve --record-profile` records what a real vhost-user
//! client (libblkio) reads until confirm; `prepare --boot-profile` stages exactly those
//! chunks home (nginx serves nothing for them afterwards); `serve --boot-profile`
//! hydrates with it; `publish --boot-profile` embeds it in the chunk-store index.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::blkio_client::Client;
use common::disk::{cli_err, cli_ok, sha256};
use common::nginx::Nginx;
use common::serve::Served;

const CS: usize = 64 << 10;

/// Reads `len` bytes at `off` through the client and checks them against `target`.
fn read_check(c: &mut Client, target: &[u8], off: usize, len: usize) {
    assert_eq!(c.read(off as u64, 0, len), 0, "read {off}+{len} failed");
    assert!(
        c.buf(0..len) == &target[off..off + len],
        "wrong bytes at {off}+{len}"
    );
}

fn profile_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn chunks_of(v: &serde_json::Value) -> Vec<u64> {
    v["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect()
}

fn status(disk: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&cli_ok(&["--json", "status", disk.to_str().unwrap()])).unwrap();
    v["status"].clone()
}

fn new_disk(dir: &Path, name: &str, seed: u64, len: usize) -> PathBuf {
    let d = dir.join(name);
    std::fs::write(&d, common::random_bytes(seed, len)).unwrap();
    d
}

#[test]
fn record_prepare_serve_and_publish_with_a_boot_profile() {
    let nginx = Nginx::start();
    // Not a chunk multiple: the last chunk is short.
    let t = 4 * 1024 * 1024 + 8192;
    let target = common::random_bytes(71, t);
    nginx.put("t.img", &target);
    let url = nginx.url("t.img");
    let dir = tempfile::tempdir().unwrap();
    let d1 = new_disk(dir.path(), "d1.img", 70, 3_000_000);
    cli_ok(&["prepare", d1.to_str().unwrap(), "--target", &url]);
    let home_default = status(&d1)["chunks_home"].as_u64().unwrap();
    assert_eq!(home_default, 16, "default boot set: the first MiB");

    // Record: reads in a known order, a repeat, one read spanning two chunks, the last
    // (short) chunk; a read after confirm is not part of the boot.
    let prof = dir.path().join("boot.profile");
    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let srv = Served::start(
        &d1,
        &sock,
        &[
            "--no-hydrate",
            "--record-profile",
            prof.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    {
        let mut c = Client::connect(&sock, 1, 2 * CS).unwrap();
        read_check(&mut c, &target, 40 * CS + 512, 4096);
        read_check(&mut c, &target, 20 * CS, CS);
        read_check(&mut c, &target, 40 * CS, 512);
        read_check(&mut c, &target, 2 * CS, 4096); // home already: still recorded
        read_check(&mut c, &target, 34 * CS - 4096, 8192); // chunks 33 and 34
        read_check(&mut c, &target, t - 4096, 4096); // chunk 64, the short one
        assert!(!prof.exists(), "profile written before confirm");
        cli_ok(&[
            "confirm",
            d1.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ]);
        read_check(&mut c, &target, 50 * CS, 4096);
    }
    let v = profile_json(&prof);
    let recorded = vec![40u64, 20, 2, 33, 34, 64];
    assert_eq!(chunks_of(&v), recorded, "{v}");
    assert_eq!(v["chunk_size"], CS as u64);
    assert_eq!(v["target_size"], t as u64);
    srv.stop();
    assert_eq!(
        chunks_of(&profile_json(&prof)),
        recorded,
        "rewritten at stop"
    );

    // Prepare with the profile: exactly the new profile chunks join the boot set.
    let d2 = new_disk(dir.path(), "d2.img", 72, 3_000_000);
    cli_ok(&[
        "prepare",
        d2.to_str().unwrap(),
        "--target",
        &url,
        "--boot-profile",
        prof.to_str().unwrap(),
    ]);
    // Chunk 2 is in the default set already.
    assert_eq!(
        status(&d2)["chunks_home"].as_u64().unwrap(),
        home_default + 5
    );
    let srv = Served::start(&d2, &sock, &["--no-hydrate"]);
    // Serve's start checked the target's identity: count from here.
    let before = nginx.access_log().len();
    {
        let mut c = Client::connect(&sock, 1, 2 * CS).unwrap();
        for &ch in &recorded {
            let off = ch as usize * CS;
            read_check(&mut c, &target, off, CS.min(t - off));
        }
        assert_eq!(
            nginx.access_log().len(),
            before,
            "profile chunks were fetched although prepare staged them"
        );
        // A chunk outside the boot set does need the network.
        read_check(&mut c, &target, 30 * CS, 4096);
        assert!(
            nginx.access_log().len() > before,
            "chunk 30 was not fetched"
        );
    }
    srv.stop();

    // Serve hydrating with the profile: the whole device ends up equal to the target.
    let d3 = new_disk(dir.path(), "d3.img", 73, 3_000_000);
    cli_ok(&["prepare", d3.to_str().unwrap(), "--target", &url]);
    let srv = Served::start(
        &d3,
        &sock,
        &[
            "--boot-profile",
            prof.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
        ],
    );
    {
        let mut c = Client::connect(&sock, 1, t).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while live_missing(&d3, &ctl) > 0 {
            assert!(Instant::now() < deadline, "hydration did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(c.read(0, 0, t), 0);
        assert_eq!(sha256(c.buf(0..t)), sha256(&target));
    }
    srv.stop();
    assert_eq!(status(&d3)["chunks_missing"].as_u64().unwrap(), 0);

    // A profile of another image is refused before anything changes.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![1u8; t + 512]).unwrap();
    let d4 = new_disk(dir.path(), "d4.img", 74, 3_000_000);
    let d4_bytes = std::fs::read(&d4).unwrap();
    nginx.put("other.img", &std::fs::read(&other).unwrap());
    let e = cli_err(&[
        "prepare",
        d4.to_str().unwrap(),
        "--target",
        &nginx.url("other.img"),
        "--boot-profile",
        prof.to_str().unwrap(),
    ]);
    assert!(e.contains("boot profile is for a"), "{e}");
    assert!(std::fs::read(&d4).unwrap() == d4_bytes, "disk changed");

    // Publish embeds it, converted to the store's chunk size.
    let st = dir.path().join("store");
    let img = dir.path().join("t.img");
    std::fs::write(&img, &target).unwrap();
    cli_ok(&[
        "publish",
        img.to_str().unwrap(),
        "--store",
        st.to_str().unwrap(),
        "--name",
        "t",
        "--chunk-size",
        "128K",
        "--boot-profile",
        prof.to_str().unwrap(),
    ]);
    let src = streamboot::source::store::StoreSource::open(
        st.to_str().unwrap(),
        "t",
        streamboot::source::store::StoreSourceOptions::insecure_unverified(),
    )
    .unwrap();
    assert_eq!(src.boot_profile(), &[20, 10, 1, 16, 17, 32]);
    let e = cli_err(&[
        "publish",
        other.to_str().unwrap(),
        "--store",
        st.to_str().unwrap(),
        "--name",
        "o",
        "--boot-profile",
        prof.to_str().unwrap(),
    ]);
    assert!(e.contains("boot profile is for a"), "{e}");
}

/// Chunks still missing, asked from the running serve.
fn live_missing(disk: &Path, ctl: &Path) -> u64 {
    let out = cli_ok(&[
        "--json",
        "status",
        disk.to_str().unwrap(),
        "--control",
        ctl.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["chunks_missing"]
        .as_u64()
        .unwrap_or_else(|| panic!("no chunks_missing in {v}"))
}

/// `serve --record-profile` saves through a temporary file with a random name created
/// with `O_EXCL`: a symlink planted at the old predictable name (`.NAME.tmp<pid>`) by
/// someone who can write to the profile's directory is not followed, so the file it
/// points to is never written.
#[test]
fn record_profile_does_not_follow_a_planted_symlink() {
    let nginx = Nginx::start();
    let target = common::random_bytes(81, 2 * 1024 * 1024);
    nginx.put("t.img", &target);
    let dir = tempfile::tempdir().unwrap();
    let d = new_disk(dir.path(), "d.img", 80, 1_000_000);
    cli_ok(&[
        "prepare",
        d.to_str().unwrap(),
        "--target",
        &nginx.url("t.img"),
    ]);
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious\n").unwrap();
    let prof = dir.path().join("boot.profile");
    let (sock, ctl) = (dir.path().join("vu.sock"), dir.path().join("ctl.sock"));
    let (p, c) = (prof.to_str().unwrap(), ctl.to_str().unwrap());
    let srv = Served::start(
        &d,
        &sock,
        &["--no-hydrate", "--record-profile", p, "--control", c],
    );
    let pid = srv.pid();
    // The name the old code wrote to, with File::create (which follows symlinks).
    let planted = dir.path().join(format!(".boot.profile.tmp{pid}"));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    {
        let mut client = Client::connect(&sock, 1, CS).unwrap();
        read_check(&mut client, &target, 5 * CS, 4096);
        cli_ok(&["confirm", d.to_str().unwrap(), "--control", c]);
    }
    srv.stop();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious\n",
        "victim written"
    );
    let meta = std::fs::symlink_metadata(&prof).unwrap();
    assert!(meta.file_type().is_file(), "the profile is a regular file");
    assert_eq!(chunks_of(&profile_json(&prof)), vec![5]);
    assert!(
        std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the planted link is left alone"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
