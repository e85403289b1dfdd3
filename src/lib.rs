//! streamboot: switch a VM from the disk image it has to a remote one without waiting for
//! the download.
//!
//! Layers, bottom up:
//! - [`boot_relocator`] (own crate): on-disk format, metadata store, boot relocation.
//! - [`source`]: remote images behind one trait (HTTP ranges, local files, chunk store).
//! - [`engine`]: the map/fetch/cache/hydrate engine that presents the target image.
//! - [`blockdev`]: the block-device seam that front ends (vhost-user-blk, NBD) talk to.
//! - [`virtio`]: the virtio-blk request layer (descriptor chains to block requests).
//! - [`vhost`]: the vhost-user-blk backend serving a block device over a unix socket.
//! - [`plain`]: a block device serving a disk as it is (after commit or rollback).
//! - [`service`]: what `serve` runs: trial boots, fallback, hydration, commit, rollback.
//! - [`migration`]: the lifecycle, owned once: the transition table, the offline
//!   operations (prepare, confirm, commit, rollback, hydrate, status) with typed reports,
//!   and the daemon wiring shared by `serve` and the demo. The CLI sits on top of it.
//! - [`nbd`]: read-only NBD exports of a store's images.
//! - [`store`]: the deduplicated, signed chunk store (publish, stats, gc).
//! - [`demo`]: `streamboot demo`, the whole migration on an embedded example.
//! - [`control`]: the control API of `serve` (HTTP/JSON over a unix socket), its client,
//!   Prometheus metrics and webhook notifications.

pub mod blockdev;
pub mod cli;
pub mod control;
pub mod demo;
pub mod engine;
pub mod migration;
pub mod nbd;
pub mod net;
pub mod plain;
pub mod profile;
pub mod seed;
pub mod service;
pub mod source;
pub mod store;
pub mod target;
pub mod vhost;
pub mod virtio;

pub use boot_relocator;
