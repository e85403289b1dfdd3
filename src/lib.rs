//! streamboot: switch a VM from the disk image it has to a remote one without waiting for
//! the download.
//!
//! Layers, bottom up:
//! - [`boot_relocator`] (own crate): on-disk format, metadata store, boot relocation.
//! - [`source`]: remote images behind one trait (HTTP ranges, local files, chunk store).
//! - [`engine`]: the map/fetch/cache/hydrate engine that presents the target image.
//! - [`blockdev`]: the block-device seam that front ends (vhost-user-blk, NBD) talk to.

pub mod blockdev;
pub mod source;
pub mod store;

pub use boot_relocator;
