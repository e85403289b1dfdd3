//! The boot relocator and streamboot's on-disk format.

pub mod storage;

pub use storage::{FileStorage, Storage};
