//! Recognising a regular file that an interrupted `prepare` extended but left without a
//! superblock (a power cut after the first write, see [`crate::format::GrowthRecord`]),
//! and giving it its length back.

use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::format::{GrowthRecord, BLOCK, GROWTH_LEN};
use crate::hostkey::HostKey;
use crate::meta::MetaStore;
use crate::storage::Storage;

/// A regular file that a prepare extended and no superblock verifies on: `source_size`
/// is the length it had before. `None` for a block device, a disk with a verifying
/// superblock, a file whose last sector is no growth record under this host's key or
/// names another length, and a file holding anything but zeros between `source_size` and
/// its superblocks (bytes nobody but prepare wrote there, so a guest that used the
/// larger disk keeps its data).
pub fn interrupted_growth(storage: &Arc<dyn Storage>) -> Result<Option<GrowthRecord>> {
    if storage.is_block_device() {
        return Ok(None);
    }
    let Some(key) = HostKey::load()? else {
        return Ok(None);
    };
    let len = storage.len().ctx(|| "reading disk size".into())?;
    if len < 2 * BLOCK as u64 {
        return Ok(None);
    }
    let mut tail = [0u8; GROWTH_LEN];
    storage
        .read_at(len - GROWTH_LEN as u64, &mut tail)
        .ctx(|| "reading the disk's last sector".into())?;
    let Some(rec) = GrowthRecord::decode(&tail, &key).filter(|r| r.disk_len == len) else {
        return Ok(None);
    };
    if MetaStore::open_with_key(storage.clone(), key)?.is_some() {
        return Ok(None);
    }
    let zeros_end = len - 2 * BLOCK as u64;
    if rec.source_size > zeros_end
        || crate::area::first_nonzero(
            storage.as_ref(),
            rec.source_size,
            zeros_end,
            "the disk's extension",
        )?
        .is_some()
    {
        return Ok(None);
    }
    Ok(Some(rec))
}

/// Truncates a file [`interrupted_growth`] recognised back to its length before prepare.
/// Returns what was undone (`None`: nothing to undo).
pub fn undo_interrupted_growth(storage: &Arc<dyn Storage>) -> Result<Option<GrowthRecord>> {
    let Some(rec) = interrupted_growth(storage)? else {
        return Ok(None);
    };
    storage
        .set_len(rec.source_size)
        .ctx(|| "truncating the disk file back to its size before prepare".into())?;
    Ok(Some(rec))
}
