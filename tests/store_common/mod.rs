//! Helpers shared by the chunk-store tests: deterministic test images and an independent
//! model of what a store must hold (computed with SHA-256, not with the store's BLAKE3).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

pub const MIB: usize = 1024 * 1024;
/// Chunk size used by most tests.
pub const CS: usize = 64 * 1024;

/// Random bytes from a seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Image A: 24 MiB of random data with zero runs, a half-zero chunk and a chunk repeated
/// three times inside the image.
pub fn image_a() -> Vec<u8> {
    let mut img = random_bytes(1, 24 * MIB);
    img[10 * CS..20 * CS].fill(0);
    img[100 * CS..103 * CS].fill(0);
    img[30 * CS..30 * CS + CS / 2].fill(0); // half zero: not a zero chunk
    let dup = img[50 * CS..51 * CS].to_vec();
    img[51 * CS..52 * CS].copy_from_slice(&dup);
    img[200 * CS..201 * CS].copy_from_slice(&dup);
    img
}

/// Image B: derived from A with changed regions, different zero runs, one flipped byte,
/// and 12345 more bytes (a short last chunk).
pub fn image_b(a: &[u8]) -> Vec<u8> {
    let mut img = a.to_vec();
    img.extend_from_slice(&random_bytes(3, 12345));
    let changed = random_bytes(2, 50 * CS);
    img[150 * CS..200 * CS].copy_from_slice(&changed);
    let refill = random_bytes(4, 10 * CS);
    img[10 * CS..20 * CS].copy_from_slice(&refill);
    img[300 * CS..320 * CS].fill(0);
    img[5 * CS + 77] ^= 0x5a;
    img
}

/// Independent model of one image's chunks: SHA-256 of each non-zero chunk.
pub struct Model {
    pub chunks: Vec<Option<[u8; 32]>>,
    pub lens: HashMap<[u8; 32], u64>,
}

pub fn model(img: &[u8], cs: usize) -> Model {
    let mut chunks = Vec::new();
    let mut lens = HashMap::new();
    for c in img.chunks(cs) {
        if c.iter().all(|&b| b == 0) {
            chunks.push(None);
        } else {
            let h: [u8; 32] = Sha256::digest(c).into();
            lens.insert(h, c.len() as u64);
            chunks.push(Some(h));
        }
    }
    Model { chunks, lens }
}

impl Model {
    pub fn distinct(&self) -> BTreeSet<[u8; 32]> {
        self.chunks.iter().flatten().copied().collect()
    }
    pub fn zero_chunks(&self) -> u64 {
        self.chunks.iter().filter(|c| c.is_none()).count() as u64
    }
}

/// Every chunk object file in a store: relative file name -> decoded content checked
/// against its name. Panics on a malformed or corrupt object.
pub fn objects_on_disk(store: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let chunks = store.join("chunks");
    if !chunks.exists() {
        return out;
    }
    for sub in std::fs::read_dir(&chunks).unwrap() {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&sub).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            let raw = std::fs::read(&p).unwrap();
            let (hex, data) = match name.strip_suffix(".zst") {
                Some(h) => (h.to_owned(), zstd::bulk::decompress(&raw, 8 * MIB).unwrap()),
                None => (name.clone(), raw),
            };
            assert_eq!(hex, blake3::hash(&data).to_hex().as_str(), "{p:?}");
            assert!(sub.ends_with(&hex[..2]));
            out.insert(name, data);
        }
    }
    out
}

/// Distinct SHA-256s of the objects on disk (independent of the store's naming).
pub fn object_sha_set(store: &Path) -> BTreeSet<[u8; 32]> {
    objects_on_disk(store)
        .values()
        .map(|d| Sha256::digest(d).into())
        .collect()
}

/// A temp dir holding an image file.
pub fn write_image(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A deterministic signing key.
pub fn key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}
