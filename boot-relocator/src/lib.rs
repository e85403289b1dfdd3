//! The boot relocator and streamboot's on-disk format.
//!
//! - [`area`]: the released area of a block device in a free gap (format v3).
//! - [`storage`]: positional disk I/O (file or block device) behind a trait.
//! - [`format`]: byte layout of superblocks and map pages (format v2).
//! - [`hostkey`]: the host key that authenticates superblocks.
//! - [`gpt`]: checking a GPT; moving a committed target's backup GPT to the device's end.
//! - `mbr`: MBR primary entries and the EBR chain of logical partitions.
//! - [`growth`]: recognising a file an interrupted prepare extended.
//! - [`meta`]: the metadata store and its durability protocol.
//! - [`partition`]: which disk ranges a partition table says are in use.
//! - [`relocate`]: prepare (relocate boot chunks), rollback, removal of the area.

mod adopt;
pub mod area;
pub mod error;
pub mod format;
pub mod gpt;
pub mod growth;
pub mod hostkey;
mod lock;
mod mbr;
pub mod meta;
mod pages;
pub mod partition;
pub mod relocate;
pub mod storage;

pub use error::{RelocError, Result};
pub use format::{Entry, Layout, Location, PreparePhase, State, Superblock, TargetRecord};
pub use hostkey::HostKey;
pub use meta::{MetaStore, PageBatch};
pub use pages::{MapCounts, PAGE_CACHE_PAGES};
pub use relocate::{plan, prepare, remove_area, resume_prepare, rollback, Plan, PrepareSpec};
pub use storage::{FileStorage, Storage};
