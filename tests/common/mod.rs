//! Helpers shared by the integration tests: `mod common;` in a test file brings them in.
//!
//! Not every test file uses every helper, hence the module-wide `dead_code` allowance.
#![allow(dead_code)]

pub mod blkio_client;
pub mod disk;
pub mod fault_proxy;
pub mod moto;
pub mod nginx;
pub mod pki;
pub mod powerloss;
pub mod serve;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` pseudo-random bytes, the same for the same `seed` (so failures reproduce).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// A deterministic random generator for choosing offsets and lengths in tests.
pub fn test_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A loopback TCP port that nothing listens on (bound once, then released).
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}
