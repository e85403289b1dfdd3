//! Guest memory the frontend shares with us at `SET_MEM_TABLE` / `ADD_MEM_REG`: each region
//! is a mapping of a file the frontend owns. If the frontend shrinks that file afterwards,
//! touching the mapping raises SIGBUS and kills the backend. A region is accepted when its
//! file is large enough and sealed against shrinking (`F_SEAL_SHRINK`; QEMU's
//! `memory-backend-memfd` seals by default), or when the operator allowed unsealed memory
//! (`serve --allow-unsealed-memory`, for frontends such as libblkio that do not seal).

use std::io;
use std::os::unix::io::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Checks every region of `mem`; the first unsafe one is the error. `serve` calls it on
/// the memory the vhost-user crate built at every `SET_MEM_TABLE` / `ADD_MEM_REG`
/// before it touches any of it (the `vhost_memory` fuzz target calls it the same way).
pub fn check_regions(mem: &GuestMemoryMmap<()>, allow_unsealed: bool) -> io::Result<()> {
    for r in mem.iter() {
        let gpa = r.start_addr().0;
        let Some(fo) = r.file_offset() else {
            return Err(refused(gpa, "it is not backed by a shared file"));
        };
        let end = fo
            .start()
            .checked_add(r.len())
            .ok_or_else(|| refused(gpa, "its size overflows"))?;
        let size = fo.file().metadata()?.len();
        if size < end {
            return Err(refused(
                gpa,
                &format!(
                    "it maps bytes {}..{end} of a file of {size} bytes",
                    fo.start()
                ),
            ));
        }
        if !allow_unsealed && !sealed_against_shrinking(fo.file()) {
            return Err(refused(
                gpa,
                "its file is not sealed against shrinking (F_SEAL_SHRINK): the frontend could \
                 truncate it under us; use a sealed memfd (QEMU memory-backend-memfd seals by \
                 default) or serve --allow-unsealed-memory",
            ));
        }
    }
    Ok(())
}

fn sealed_against_shrinking(file: &std::fs::File) -> bool {
    // SAFETY: F_GET_SEALS only reads the seals of a descriptor we hold open; it fails
    // harmlessly (EINVAL) on files that are not memfds.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

fn refused(gpa: u64, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("guest memory region at {gpa:#x} refused: {why}"),
    )
}
