//! The bench's guest in a build without the `demo-blkio` feature: there is no libblkio
//! client, so `streamboot bench` is not built in ([`super::BUILT_IN`] is false).

use std::path::Path;

use super::{BenchError, Ops, WorkloadResult};

/// Fails: this build has no libblkio client.
pub fn run(
    _sock: &Path,
    _ops: &mut Ops,
    _block_size: usize,
    _queue_depth: usize,
    _progress: &dyn Fn(u64),
) -> Result<WorkloadResult, BenchError> {
    Err(BenchError::NotBuiltIn)
}
