//! Helpers shared by the integration tests.

pub mod blkio_client;
