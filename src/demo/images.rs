//! The demo's v1/v2 image pair: a real bootable pair built by `vm-tests/build-images.sh`
//! (embedded here, so the script stays the one source of truth), or a synthetic pair built
//! in Rust when the tools for the real one are missing or `--synthetic` asks for it.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::DemoError;

/// Files the embedded build scripts need, at the same relative paths as in `vm-tests/`.
pub const SCRIPTS: &[(&str, &str)] = &[
    (
        "build-images.sh",
        include_str!("../../vm-tests/build-images.sh"),
    ),
    (
        "build-guest.sh",
        include_str!("../../vm-tests/build-guest.sh"),
    ),
    (
        "guest/image-init",
        include_str!("../../vm-tests/guest/image-init"),
    ),
    (
        "guest/image-init-bad",
        include_str!("../../vm-tests/guest/image-init-bad"),
    ),
    (
        "guest/initramfs-init",
        include_str!("../../vm-tests/guest/initramfs-init"),
    ),
];

/// Tools `build-images.sh` needs.
const IMAGE_TOOLS: &[&str] = &[
    "mkfs.ext4",
    "debugfs",
    "sfdisk",
    "perl",
    "busybox",
    "cksum",
    "dd",
    "truncate",
];

/// Which kind of pair was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// MBR + ext4 root with busybox and an init that checks a manifest (bootable).
    Real,
    /// MBR + pseudo-random data, most chunks shared between v1 and v2 (not bootable).
    Synthetic,
}

impl Kind {
    /// Lower-case name, as in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Real => "real",
            Kind::Synthetic => "synthetic",
        }
    }
}

/// The pair, in memory.
pub struct Pair {
    pub kind: Kind,
    pub v1: Vec<u8>,
    pub v2: Vec<u8>,
}

/// True when `tool` is on `PATH` (or in /sbin, /usr/sbin, where Debian keeps mkfs).
pub fn have(tool: &str) -> bool {
    let extra = ["/usr/sbin", "/sbin"];
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(extra.iter().map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// Tools missing for the real pair (empty: it can be built).
pub fn missing_image_tools() -> Vec<&'static str> {
    IMAGE_TOOLS.iter().copied().filter(|t| !have(t)).collect()
}

/// Writes the embedded scripts under `dir` (as `dir/build-images.sh`, `dir/guest/...`).
pub fn write_scripts(dir: &Path) -> Result<(), DemoError> {
    for (rel, text) in SCRIPTS {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DemoError::io(parent, e))?;
        }
        // Rewrite only when different: the scripts' caches hash these files.
        if std::fs::read_to_string(&p).ok().as_deref() != Some(*text) {
            std::fs::write(&p, text).map_err(|e| DemoError::io(&p, e))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| DemoError::io(&p, e))?;
    }
    Ok(())
}

/// Runs `bash SCRIPT ARGS` from the embedded scripts in `scripts`, its output to `log`.
pub fn run_script(scripts: &Path, name: &str, args: &[&Path], log: &Path) -> Result<(), DemoError> {
    let out = std::fs::File::create(log).map_err(|e| DemoError::io(log, e))?;
    let err = out.try_clone().map_err(|e| DemoError::io(log, e))?;
    let status = Command::new("bash")
        .arg(scripts.join(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| DemoError::io(Path::new("bash"), e))?;
    if !status.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(3).collect();
        return Err(DemoError::Script {
            name: name.to_string(),
            log: log.to_path_buf(),
            tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(())
}

/// Builds (or reuses from the cache) the real pair in `cache/images`.
pub fn real(cache: &Path) -> Result<Pair, DemoError> {
    let scripts = cache.join("scripts");
    write_scripts(&scripts)?;
    let out = cache.join("images");
    std::fs::create_dir_all(&out).map_err(|e| DemoError::io(&out, e))?;
    run_script(
        &scripts,
        "build-images.sh",
        &[&out],
        &cache.join("build-images.log"),
    )?;
    let read = |n: &str| {
        let p = out.join(n);
        std::fs::read(&p).map_err(|e| DemoError::io(&p, e))
    };
    Ok(Pair {
        kind: Kind::Real,
        v1: read("v1.img")?,
        v2: read("v2.img")?,
    })
}

/// Chunk granularity of the synthetic pair's differences.
const UNIT: usize = 64 << 10;
/// Synthetic sizes: v2 is larger than v1, like an OS upgrade that grew.
const V1_LEN: usize = 12 << 20;
const V2_LEN: usize = 16 << 20;

/// Pseudo-random bytes for unit `i` of `version` (deterministic).
fn fill(buf: &mut [u8], version: &str, i: usize) {
    let mut h = blake3::Hasher::new();
    h.update(b"streamboot-demo");
    h.update(version.as_bytes());
    h.update(&(i as u64).to_le_bytes());
    h.finalize_xof().fill(buf);
}

/// An MBR with one bootable Linux partition from 1 MiB to the end of a `len`-byte disk.
fn mbr(len: usize, disk_id: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[440..444].copy_from_slice(&disk_id.to_le_bytes());
    let e = &mut s[446..462];
    e[0] = 0x80;
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&((len / 512 - 2048) as u32).to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// The synthetic pair: v2 shares most 64 KiB units with v1 at the same offsets, changes
/// every 7th, has a zero stretch, and grows past v1's end with new data.
pub fn synthetic() -> Pair {
    let mut v1 = vec![0u8; V1_LEN];
    let mut v2 = vec![0u8; V2_LEN];
    for i in 1..V1_LEN / UNIT {
        fill(&mut v1[i * UNIT..(i + 1) * UNIT], "shared", i);
    }
    for i in 1..V2_LEN / UNIT {
        let r = i * UNIT..(i + 1) * UNIT;
        match i {
            _ if (40..48).contains(&i) => {} // zeros in v2
            _ if i < V1_LEN / UNIT && i % 7 != 0 => v2[r.clone()].copy_from_slice(&v1[r]),
            _ => fill(&mut v2[r], "v2", i),
        }
    }
    v1[..512].copy_from_slice(&mbr(V1_LEN, 0x5b000001));
    v2[..512].copy_from_slice(&mbr(V2_LEN, 0x5b000002));
    Pair {
        kind: Kind::Synthetic,
        v1,
        v2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_pair_shares_most_units() {
        let p = synthetic();
        let shared = (0..V1_LEN / UNIT)
            .filter(|i| p.v1[i * UNIT..(i + 1) * UNIT] == p.v2[i * UNIT..(i + 1) * UNIT])
            .count();
        let units = V1_LEN / UNIT;
        assert!(
            shared > units * 3 / 4 && shared < units,
            "{shared} of {units}"
        );
        assert_eq!(&p.v2[510..512], &[0x55, 0xaa]);
        assert_ne!(p.v1, p.v2[..V1_LEN]);
    }
}
