//! `streamboot serve`'s memory does not grow with the target (issue 14): the real binary
//! serves a sparse 256 GiB target (4.2 M chunks of 64 KiB) from a real nginx, libblkio
//! reads random blocks all over it and writes a few, and the serve process's peak
//! resident set (`VmHWM`) stays under 48 MiB. With the whole map in memory (20 bytes
//! a chunk plus four per slot) it was above 100 MiB.

mod common;

use rand::Rng;

use common::blkio_client::Client;
use common::disk::cli_ok;
use common::nginx::Nginx;
use common::serve::Served;

const BLOCK: usize = 4096;

/// (VmRSS, VmHWM) of process `pid` in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn serve_memory_does_not_grow_with_the_target() {
    let nginx = Nginx::start();
    let size: u64 = 256 << 30;
    std::fs::File::create(nginx.root().join("big.img"))
        .and_then(|f| f.set_len(size))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(5, 16 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    cli_ok(&["prepare", d, "--target", &nginx.url("big.img")]);
    cli_ok(&["confirm", d]);
    let sock = dir.path().join("sb.sock");
    let served = Served::start(&disk, &sock, &["--no-hydrate"]);

    let depth = 16;
    let mut c = Client::connect(&sock, 1, BLOCK * depth).unwrap();
    assert_eq!(c.capacity, size);
    let mut rng = common::test_rng(14);
    let blocks = size / BLOCK as u64;
    for round in 0..100 {
        for slot in 0..depth {
            let o = rng.random_range(0..blocks) * BLOCK as u64;
            if round % 10 == 9 && slot == 0 {
                c.buf(0..BLOCK).fill(0xA5);
                c.submit_write(0, o, 0, BLOCK, slot);
            } else {
                c.submit_read(0, o, slot * BLOCK, BLOCK, slot);
            }
        }
        let mut left = depth;
        while left > 0 {
            for done in c.wait(0, 1).unwrap() {
                assert_eq!(
                    done.ret, 0,
                    "request {} of round {round} failed",
                    done.user_data
                );
                left -= 1;
            }
        }
    }
    let (rss_kib, hwm_kib) = rss(served.pid());
    println!("serve over 256 GiB: VmRSS {rss_kib} KiB, VmHWM {hwm_kib} KiB");
    assert!(
        hwm_kib < 48 << 10,
        "serve's peak RSS is {hwm_kib} KiB over a 256 GiB target (limit 48 MiB)"
    );
    drop(c);
    served.stop();
}
