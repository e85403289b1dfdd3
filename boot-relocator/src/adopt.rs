//! Explicit adoption of a disk prepared by a streamboot before format v2.
//!
//! Format v1 superblocks carry no MAC: one could have been written by a guest, so they
//! are never trusted silently (the disk reads as plain, with a warning). An operator who
//! knows the disk was prepared on this host by an older streamboot adopts it: the v1
//! metadata is read with the v1 rules (the newest valid copy of each block), and both
//! copies of every map page and superblock are rewritten, the superblock as format v2
//! under this host's key.

use std::sync::Arc;

use crate::error::{IoContext, RelocError, Result};
use crate::format::{Layout, PreparePhase, State, Superblock, BLOCK};
use crate::hostkey::HostKey;
use crate::meta::{read_map, read_superblocks, MapScan, MetaStore};
use crate::storage::Storage;

impl MetaStore {
    /// Adopts a format-v1 disk (see the module documentation) under the host key
    /// ([`HostKey::load_or_create`]). Refuses a disk that already verifies or holds no
    /// format-v1 superblock for its size, writing nothing.
    pub fn adopt_legacy(storage: Arc<dyn Storage>) -> Result<Self> {
        Self::adopt_legacy_with_key(storage, HostKey::load_or_create()?)
    }

    /// [`Self::adopt_legacy`] with an explicit key.
    pub fn adopt_legacy_with_key(storage: Arc<dyn Storage>, key: HostKey) -> Result<Self> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        if let Some((sb, _)) = read_superblocks(storage.as_ref(), len, Some(&key))?.current {
            return Err(RelocError::AlreadyPrepared(sb.state));
        }
        let mut best: Option<Superblock> = None;
        if len >= 2 * BLOCK as u64 {
            for k in 0..2u8 {
                let mut b = vec![0u8; BLOCK];
                storage
                    .read_at(Layout::sb_addr(len, k), &mut b)
                    .ctx(|| "reading superblock".into())?;
                if let Ok(sb) = Superblock::decode_legacy_v1(&b) {
                    if sb.layout.disk_len == len
                        && best.as_ref().is_none_or(|x| sb.generation > x.generation)
                    {
                        best = Some(sb);
                    }
                }
            }
        }
        let sb = best.ok_or_else(|| {
            RelocError::Invalid(format!(
                "no format-v1 streamboot superblock for a disk of {len} bytes: nothing to adopt"
            ))
        })?;
        let reserved = sb.state == State::Preparing && sb.phase == PreparePhase::Reserved;
        let scan = if reserved {
            MapScan::empty(&sb.layout)
        } else {
            read_map(storage.as_ref(), &sb)?
        };
        let pages = sb.layout.map_pages;
        let mut m = Self::from_parts(storage, key, sb, scan);
        if !reserved {
            m.dirty_pages.extend(0..pages);
        }
        // Commits the pages into both copies, then writes the v2 superblock into both.
        m.update_sb(|_| {})?;
        Ok(m)
    }
}
