//! Writes the seed corpora (`fuzz/seeds/<target>/`) from real encodings: superblocks and
//! map pages from boot-relocator's encoders, indexes from the store's publish code (signed,
//! unsigned, compressed, with a boot profile), virtio-blk requests as a driver lays them
//! out, HTTP header values as nginx sends them, and NBD client sessions as qemu and
//! nbd-client open them (the client's bytes, written here from the protocol spec).
//!
//! Usage: `cargo run --example gen_corpus -- [SEEDS_DIR]` (default `seeds`, relative to `fuzz/`).

use std::fs;
use std::path::{Path, PathBuf};

use boot_relocator::format::{encode_page, Entry, Location, PreparePhase, ENTRIES_PER_PAGE};
use boot_relocator::{Layout, State, Superblock, TargetRecord};
use streamboot::store::{publish_with, PublishOptions};
use streamboot_fuzz::guest::*;
use streamboot_fuzz::{other_key, trusted_key};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let mut n = 0;
    for (target, seeds) in [
        ("superblock", superblocks()),
        ("map_page", map_pages()),
        ("store_index", indexes()?),
        // The same indexes (format 2: their identity blocks) for the header target.
        ("index_header", indexes()?),
        ("virtio_blk", virtio_requests()),
        ("http_headers", http_headers()),
        ("nbd_negotiate", nbd_handshakes()),
    ] {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            write(&dir, &name, &bytes)?;
            n += 1;
        }
    }
    println!("wrote {n} seeds under {}", root.display());
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn layout() -> Layout {
    let chunk_shift = 16;
    let target_size = (120u64 << 20) + 5;
    let chunks = target_size.div_ceil(1 << chunk_shift);
    Layout {
        chunk_shift,
        disk_len: 1 << 30,
        source_size: 100 << 20,
        target_size,
        area_offset: 121 << 20,
        map_offset: 121 << 20,
        map_pages: chunks.div_ceil(ENTRIES_PER_PAGE as u64),
        slot_offset: 122 << 20,
        slot_count: 1000,
    }
}

/// The host key the superblock target checks under.
fn fuzz_host_key() -> boot_relocator::HostKey {
    boot_relocator::HostKey::from_bytes(streamboot_fuzz::FUZZ_HOST_KEY)
}

fn superblocks() -> Vec<(String, Vec<u8>)> {
    let base = Superblock {
        generation: 7,
        uuid: [9; 16],
        state: State::Preparing,
        phase: PreparePhase::Reserved,
        start_counter: 0,
        max_trial_starts: 3,
        layout: layout(),
        target: TargetRecord {
            kind: "http".into(),
            validator: "\"65a1b2c3-7800005\"".into(),
            urls: vec![
                "http://127.0.0.1:8080/img.raw".into(),
                "http://mirror.example/img.raw".into(),
            ],
        },
        created_unix: 1_700_000_000,
        seeded_bytes: 0,
        release: Default::default(),
    };
    let mut out = Vec::new();
    for (i, state) in [
        State::Preparing,
        State::Prepared,
        State::Trial,
        State::Confirmed,
        State::Committing,
        State::Committed,
        State::RollingBack,
        State::RolledBack,
    ]
    .into_iter()
    .enumerate()
    {
        let sb = Superblock {
            generation: 7 + i as u64,
            state,
            phase: if i == 0 {
                PreparePhase::Reserved
            } else {
                PreparePhase::MapReady
            },
            start_counter: (i % 3) as u8,
            ..base.clone()
        };
        out.push((format!("sb-{}", state.name()), sb.encode(&fuzz_host_key())));
    }
    let store = Superblock {
        target: TargetRecord {
            kind: "store".into(),
            validator: "b3:".to_string() + &"ab".repeat(32),
            urls: vec!["/srv/store".into()],
        },
        layout: Layout {
            chunk_shift: 12,
            target_size: 8 << 20,
            source_size: 4 << 20,
            area_offset: 8 << 20,
            map_offset: 8 << 20,
            map_pages: 9,
            slot_offset: (8 << 20) + 18 * 4096,
            slot_count: 64,
            disk_len: 16 << 20,
        },
        ..base.clone()
    };
    out.push(("sb-store-4k".into(), store.encode(&fuzz_host_key())));
    out.push(("sb-zero-block".into(), vec![0u8; 4096]));
    out
}

fn map_pages() -> Vec<(String, Vec<u8>)> {
    let entries: Vec<Entry> = (0..ENTRIES_PER_PAGE as u32)
        .map(|i| Entry {
            loc: match i % 4 {
                0 => Location::Missing,
                1 => Location::Zero,
                2 => Location::Home,
                _ => Location::Slot(i),
            },
            dirty: i % 3 == 0 && i % 4 >= 2,
            saved: (i % 5 == 0).then_some(i + 1),
            boot: i % 7 == 0,
        })
        .collect();
    let mut out = Vec::new();
    for (name, count, mode) in [("full", ENTRIES_PER_PAGE, 0u8), ("last", 37, 1u8)] {
        let mut seed = Vec::new();
        seed.extend_from_slice(&(count as u16).to_le_bytes());
        seed.extend_from_slice(&1000u64.to_le_bytes());
        seed.push(mode);
        seed.extend_from_slice(&encode_page(3, 42, &[1; 16], &entries[..count]));
        out.push((format!("page-{name}"), seed));
    }
    out
}

/// Publishes small images with the real publish code and returns their index files.
fn indexes() -> Result<Vec<(String, Vec<u8>)>> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("image.raw");
    // 9 chunks of 4 KiB and a short tail: data, zeros, a repeated chunk.
    let mut bytes = Vec::new();
    for c in 0..9u32 {
        let fill = match c {
            2 | 5 => 0,
            7 => 1,
            _ => c as u8 + 1,
        };
        bytes.extend((0..4096u32).map(|i| if fill == 0 { 0 } else { (i as u8) ^ fill }));
    }
    bytes.extend_from_slice(b"tail");
    fs::write(&image, &bytes)?;
    let key = trusted_key();
    let other = other_key();
    let mut out = Vec::new();
    for (name, key, compress, profile) in [
        ("signed-zstd-profile", Some(&key), true, vec![0u32, 3, 1, 9]),
        ("signed-plain", Some(&key), false, vec![]),
        ("signed-other-key", Some(&other), false, vec![4]),
        ("unsigned-zstd", None, true, vec![8, 0]),
    ] {
        let mut opts = PublishOptions::new(4096);
        opts.key = key;
        opts.compress = compress;
        opts.boot_profile = profile;
        opts.threads = 1;
        let report = publish_with(&image, &dir.path().join("store"), name, &opts)?;
        out.push((format!("index-{name}"), fs::read(&report.index_path)?));
    }
    Ok(out)
}

/// One split descriptor as it sits in the table.
fn desc(addr: u64, len: u32, flags: u32, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Guest addresses the seeds use (all inside region 0, past the rings).
const HDR: u64 = PAYLOAD_AT;
const RANGES: u64 = PAYLOAD_AT + 0x100;
const INDIRECT: u64 = PAYLOAD_AT + 0x200;
const DATA: u64 = 0x800;
const STATUS: u64 = 0x1e00;

/// A virtio target input: a chain starting at descriptor 0, with `extra` guest bytes
/// written at their addresses.
fn request(descs: &[[u8; 16]], opts: u8, extra: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![0u8; PAYLOAD_INPUT_AT];
    for (i, d) in descs.iter().enumerate() {
        v[i * 16..i * 16 + 16].copy_from_slice(d);
    }
    v[HEAD_AT] = 0;
    v[OPTS_AT] = opts;
    // The payload covers guest memory from PAYLOAD_AT up to the last byte written.
    let end = extra
        .iter()
        .map(|(a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(PAYLOAD_AT);
    let mut payload = vec![0u8; (end - PAYLOAD_AT) as usize];
    for (addr, bytes) in extra {
        let at = (addr - PAYLOAD_AT) as usize;
        payload[at..at + bytes.len()].copy_from_slice(bytes);
    }
    v.extend_from_slice(&payload);
    v
}

fn header(req_type: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn virtio_requests() -> Vec<(String, Vec<u8>)> {
    const N: u32 = VRING_DESC_F_NEXT;
    const W: u32 = VRING_DESC_F_WRITE;
    let range = |sector: u64, sectors: u32, flags: u32| {
        let mut e = vec![0u8; 16];
        e[0..8].copy_from_slice(&sector.to_le_bytes());
        e[8..12].copy_from_slice(&sectors.to_le_bytes());
        e[12..16].copy_from_slice(&flags.to_le_bytes());
        e
    };
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let mut out = vec![
        (
            "read-4k".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 4096, N | W, 2),
                    desc(STATUS, 1, W, 0),
                ],
                0,
                &[(HDR, header(VIRTIO_BLK_T_IN, 8))],
            ),
        ),
        (
            "read-split-header-region1".to_string(),
            request(
                &[
                    desc(HDR, 4, N, 1),
                    desc(HDR + 4, 12, N, 2),
                    desc(DATA, 512, N | W, 3),
                    desc(REGION1_START, 1024, N | W, 4),
                    desc(STATUS, 1, W, 0),
                ],
                0,
                &[(HDR, header(VIRTIO_BLK_T_IN, 100))],
            ),
        ),
        (
            "write-2seg".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 2048, N, 2),
                    desc(DATA + 0x1000, 1024, N, 3),
                    desc(STATUS, 1, W, 0),
                ],
                0,
                &[(HDR, header(VIRTIO_BLK_T_OUT, 3)), (DATA, data.clone())],
            ),
        ),
        (
            "write-through".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 512, N, 2),
                    desc(STATUS, 1, W, 0),
                ],
                2,
                &[(HDR, header(VIRTIO_BLK_T_OUT, 127)), (DATA, data.clone())],
            ),
        ),
        (
            "write-read-only".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 512, N, 2),
                    desc(STATUS, 1, W, 0),
                ],
                1,
                &[(HDR, header(VIRTIO_BLK_T_OUT, 0))],
            ),
        ),
        (
            "flush".to_string(),
            request(
                &[desc(HDR, 16, N, 1), desc(STATUS, 1, W, 0)],
                0,
                &[(HDR, header(VIRTIO_BLK_T_FLUSH, 0))],
            ),
        ),
        (
            "get-id".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(DATA, 20, N | W, 2),
                    desc(STATUS, 1, W, 0),
                ],
                0,
                &[(HDR, header(VIRTIO_BLK_T_GET_ID, 0))],
            ),
        ),
        (
            "discard-2".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(RANGES, 32, N, 2),
                    desc(STATUS, 1, W, 0),
                ],
                0,
                &[
                    (HDR, header(VIRTIO_BLK_T_DISCARD, 0)),
                    (RANGES, [range(0, 8, 0), range(64, 16, 0)].concat()),
                ],
            ),
        ),
        (
            "write-zeroes-unmap-4k".to_string(),
            request(
                &[
                    desc(HDR, 16, N, 1),
                    desc(RANGES, 16, N, 2),
                    desc(STATUS, 1, W, 0),
                ],
                4,
                &[
                    (HDR, header(VIRTIO_BLK_T_WRITE_ZEROES, 0)),
                    (RANGES, range(8, 8, 1)),
                ],
            ),
        ),
        (
            "unsupported-type".to_string(),
            request(
                &[desc(HDR, 16, N, 1), desc(STATUS, 1, W, 0)],
                0,
                &[(HDR, header(0x7f, 0))],
            ),
        ),
    ];
    // An indirect chain: the head points at a 3-entry table in guest memory.
    let table = [
        desc(HDR, 16, N, 1),
        desc(DATA, 4096, N | W, 2),
        desc(STATUS, 1, W, 0),
    ]
    .concat();
    out.push((
        "read-indirect".to_string(),
        request(
            &[desc(INDIRECT, 48, VRING_DESC_F_INDIRECT, 0)],
            0,
            &[(HDR, header(VIRTIO_BLK_T_IN, 16)), (INDIRECT, table)],
        ),
    ));
    out
}

fn http_headers() -> Vec<(String, Vec<u8>)> {
    [
        ("probe", "bytes 0-0/104857605|1|\"65a1b2c3-6400005\""),
        (
            "range",
            "bytes 65536-131071/104857605|65536|\"65a1b2c3-6400005\"",
        ),
        (
            "unknown-total",
            "bytes 4096-8191/*|4096|W/\"65a1b2c3-6400005\"",
        ),
        ("unsatisfied", "bytes */104857605|0|"),
        ("weak-etag", "bytes 0-0/1| 1 |W/\"x\""),
    ]
    .into_iter()
    .map(|(name, v)| (format!("hdr-{name}"), v.as_bytes().to_vec()))
    .collect()
}

/// The client side of NBD sessions (RFC-style constants of the NBD protocol spec).
mod nbd_client {
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const FIXED_NEWSTYLE: u32 = 1;
    pub const NO_ZEROES: u32 = 2;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const INFO_BLOCK_SIZE: u16 = 3;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;

    pub fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&opt.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO` data: name, then the info types asked for.
    pub fn info(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    pub fn request(out: &mut Vec<u8>, kind: u16, cookie: u64, offset: u64, len: u32) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
}

fn nbd_handshakes() -> Vec<(String, Vec<u8>)> {
    use nbd_client::*;
    let flags = |f: u32| f.to_be_bytes().to_vec();
    let mut out = Vec::new();

    // qemu: structured replies, then GO on the default export asking for block sizes,
    // then reads (one crossing the partial last sector) and a disconnect.
    let mut s = flags(FIXED_NEWSTYLE | NO_ZEROES);
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_GO, &info("", &[INFO_BLOCK_SIZE]));
    request(&mut s, CMD_READ, 1, 0, 512);
    request(&mut s, CMD_READ, 2, 65536, 17);
    request(&mut s, CMD_READ, 3, 65536, 512);
    request(&mut s, CMD_DISC, 4, 0, 0);
    out.push(("qemu-go-structured".to_string(), s));

    // nbd-client -l: list, then abort.
    let mut s = flags(FIXED_NEWSTYLE | NO_ZEROES);
    option(&mut s, OPT_LIST, &[]);
    option(&mut s, OPT_ABORT, &[]);
    out.push(("list-abort".to_string(), s));

    // An old client: EXPORT_NAME without NO_ZEROES, simple replies, refused writes.
    let mut s = flags(FIXED_NEWSTYLE);
    option(&mut s, OPT_EXPORT_NAME, b"boot.img");
    request(&mut s, CMD_READ, 7, 4096, 4096);
    request(&mut s, CMD_FLUSH, 8, 0, 0);
    request(&mut s, CMD_TRIM, 9, 0, 4096);
    request(&mut s, CMD_WRITE, 10, 0, 4);
    s.extend_from_slice(b"data");
    request(&mut s, CMD_READ, 11, 3 * 4096, 1);
    request(&mut s, CMD_DISC, 12, 0, 0);
    out.push(("export-name-simple".to_string(), s));

    // INFO first, an unknown export, then GO on the empty export.
    let mut s = flags(FIXED_NEWSTYLE | NO_ZEROES);
    option(&mut s, OPT_INFO, &info("boot.img", &[INFO_BLOCK_SIZE, 0]));
    option(&mut s, OPT_GO, &info("missing", &[]));
    option(&mut s, 42, b"unknown option");
    option(&mut s, OPT_GO, &info("empty", &[]));
    request(&mut s, CMD_READ, 1, 0, 0);
    request(&mut s, CMD_READ, 2, 0, 1);
    out.push(("info-unknown-empty".to_string(), s));
    out
}
