//! Guest memory a hostile vhost-user frontend shares at `SET_MEM_TABLE` / `ADD_MEM_REG`:
//! fuzzed region tables (file sizes, mmap offsets, region sizes, guest addresses,
//! overlapping regions, regions sharing a file), memfds with fuzzed seals (or none, or
//! sealing not allowed), built into a `GuestMemoryMmap` exactly as the vhost-user-backend
//! crate does (`MmapRegion::from_file`, `GuestRegionMmap::new`, `from_regions`, and for
//! ADD_MEM_REG `insert_region`), then checked by `streamboot::vhost::memory::check_regions`,
//! the function `serve` calls before it touches the memory.
//!
//! Asserts: it never panics; it accepts exactly when every region lies inside its file
//! and, unless unsealed memory is allowed, its file is sealed against shrinking (computed
//! here from what the harness did, not read back); a refusal is one line naming the
//! region. After an acceptance the frontend's attack runs: each sealed file is truncated
//! to a fuzzed smaller size (the kernel must refuse), then every page of every region is
//! read and written through vm-memory; a wrong acceptance is a SIGBUS, which libFuzzer
//! reports as a crash.
#![no_main]

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use streamboot::vhost::memory::check_regions;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const PAGE: u64 = 4096;
/// Bytes of input per region.
const REGION_BYTES: usize = 11;

/// One fuzzed file: its size as set and the seals the kernel accepted.
struct Memfd {
    file: File,
    size: u64,
    shrink_sealed: bool,
}

fn memfd(size: u64, seal_bits: u8, allow_sealing: bool) -> Option<Memfd> {
    let flags = if allow_sealing {
        libc::MFD_ALLOW_SEALING
    } else {
        0
    };
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned by `file`.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), flags) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).ok()?;
    let mut seals = 0;
    for (bit, seal) in [
        (1, libc::F_SEAL_SHRINK),
        (2, libc::F_SEAL_GROW),
        (4, libc::F_SEAL_WRITE),
        (8, libc::F_SEAL_FUTURE_WRITE),
        (16, libc::F_SEAL_SEAL),
    ] {
        if seal_bits & bit != 0 {
            seals |= seal;
        }
    }
    // SAFETY: F_ADD_SEALS on our own memfd; fails (EPERM) without MFD_ALLOW_SEALING.
    let added = seals != 0 && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } == 0;
    Some(Memfd {
        file,
        size,
        shrink_sealed: added && seals & libc::F_SEAL_SHRINK != 0,
    })
}

/// A region as the frontend describes it.
struct Region {
    file: usize,
    offset: u64,
    size: u64,
    gpa: u64,
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let allow_unsealed = data[0] & 1 != 0;
    let add_mem_reg = data[0] & 2 != 0;
    let count = 1 + usize::from(data[1] % 4);
    let body = &data[2..];
    if body.len() < count * REGION_BYTES {
        return;
    }
    let mut files: Vec<Memfd> = Vec::new();
    let mut regions = Vec::new();
    let mut truncate_to = Vec::new();
    for r in body.chunks(REGION_BYTES).take(count) {
        let f = r[1];
        let file = if f & 64 != 0 && !files.is_empty() {
            files.len() - 1 // the same file as the previous region
        } else {
            let size = u64::from(r[0] % 17) * PAGE + if f & 1 != 0 { u64::from(r[2]) } else { 0 };
            match memfd(size, r[9], f & 32 == 0) {
                Some(m) => files.push(m),
                None => return,
            }
            files.len() - 1
        };
        let offset = u64::from(r[3] % 5) * PAGE + if f & 2 != 0 { u64::from(r[4]) } else { 0 };
        let size = if f & 128 != 0 {
            1 << 32
        } else {
            u64::from(r[5] % 9) * PAGE + if f & 4 != 0 { u64::from(r[6]) } else { 0 }
        };
        let gpa = if f & 16 != 0 {
            u64::MAX - u64::from(r[7]) * PAGE
        } else {
            u64::from(r[7]) * PAGE + if f & 8 != 0 { u64::from(r[8]) } else { 0 }
        };
        regions.push(Region {
            file,
            offset,
            size,
            gpa,
        });
        truncate_to.push(u64::from(r[10]) * 256);
    }

    // Built as vhost-user-backend's set_mem_table / add_mem_region do; any error there is
    // the crate refusing the table before streamboot sees it.
    let mut built = Vec::new();
    for r in &regions {
        let Ok(file) = files[r.file].file.try_clone() else {
            return;
        };
        let Ok(mmap) =
            MmapRegion::<()>::from_file(FileOffset::new(file, r.offset), r.size as usize)
        else {
            return;
        };
        let Some(region) = GuestRegionMmap::new(mmap, GuestAddress(r.gpa)) else {
            return;
        };
        built.push(region);
    }
    let last = if add_mem_reg && built.len() > 1 {
        built.pop()
    } else {
        None
    };
    let Ok(mut mem) = GuestMemoryMmap::from_regions(built) else {
        return;
    };
    if let Some(region) = last {
        match mem.insert_region(Arc::new(region)) {
            Ok(m) => mem = m,
            Err(_) => return,
        }
    }

    let verdict = check_regions(&mem, allow_unsealed);
    let safe = |r: &Region| {
        let f = &files[r.file];
        r.offset
            .checked_add(r.size)
            .is_some_and(|end| end <= f.size)
            && (allow_unsealed || f.shrink_sealed)
    };
    let expected = regions.iter().all(safe);
    match &verdict {
        Ok(()) => assert!(expected, "an unsafe region was accepted"),
        Err(e) => {
            assert!(!expected, "a safe table was refused: {e}");
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            assert!(msg.contains("refused"), "error does not say refused: {msg}");
            return;
        }
    }

    // The attack: shrink every sealed file (the kernel must refuse), then touch all of
    // guest memory. Unsealed memory the operator allowed is not attacked (a documented
    // risk of --allow-unsealed-memory).
    for (i, f) in files.iter().enumerate() {
        let target = truncate_to[i.min(truncate_to.len() - 1)];
        if f.shrink_sealed && target < f.size {
            // SAFETY: ftruncate on our own memfd.
            let rc = unsafe { libc::ftruncate(f.file.as_raw_fd(), target as libc::off_t) };
            assert_ne!(rc, 0, "a file sealed against shrinking was shrunk");
        }
    }
    for r in &regions {
        let mut at = 0;
        while at < r.size {
            let a = GuestAddress(r.gpa + at);
            let v: u8 = mem.read_obj(a).expect("accepted memory is readable");
            mem.write_obj(v.wrapping_add(1), a)
                .expect("accepted memory is writable");
            at += PAGE;
        }
    }
});
