//! The demo's guest when there is no VM, in a build without the `demo-blkio` feature:
//! there is no libblkio client, so the no-VM path reports what is missing.

use std::path::Path;

use super::DemoError;

/// Stands in for the libblkio client; [`Client::connect`] always fails.
pub struct Client {
    /// Device size in bytes.
    pub capacity: u64,
    /// No value of this type exists, so neither does a `Client`.
    never: std::convert::Infallible,
}

impl Client {
    /// Fails: this build has no libblkio client.
    pub fn connect(_path: &Path) -> Result<Self, DemoError> {
        Err(DemoError::Failed(
            "this build has no blkio client (built without the `demo-blkio` feature): the demo \
             needs QEMU to boot a VM, or a build with `--features demo-blkio`"
                .into(),
        ))
    }

    /// Unreachable: no `Client` exists.
    pub fn read(&mut self, _off: u64, _out: &mut [u8]) -> Result<(), DemoError> {
        match self.never {}
    }

    /// Unreachable: no `Client` exists.
    pub fn write(&mut self, _off: u64, _data: &[u8]) -> Result<(), DemoError> {
        match self.never {}
    }

    /// Unreachable: no `Client` exists.
    pub fn flush(&mut self) -> Result<(), DemoError> {
        match self.never {}
    }

    /// Unreachable: no `Client` exists.
    pub fn verify(
        &mut self,
        _expect: &[u8],
        _progress: &dyn Fn(u64),
    ) -> Result<Option<u64>, DemoError> {
        match self.never {}
    }
}
