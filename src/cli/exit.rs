//! Exit codes per kind of error: the CLI walks an error's cause chain and looks at the
//! library's typed errors to tell a wrong command line from a disk in use, a refused state
//! transition, a network failure, bad data (integrity) and local I/O.
//!
//! Several library errors wrap another one `transparent`ly (their `source()` skips the
//! wrapped error), so each wrapper's classifier looks inside it itself instead of relying
//! on the chain alone.

use std::error::Error;
use std::io;

use boot_relocator::RelocError;

use crate::bench::BenchError;
use crate::blockdev::BlockError;
use crate::control::client::ClientError;
use crate::control::BindError;
use crate::engine::EngineError;
use crate::migration::daemon::DaemonError;
use crate::migration::{Conflict, MigrationError, StepError};
use crate::seed::SeedError;
use crate::service::ServiceError;
use crate::source::cache::CacheError;
use crate::source::SourceError;
use crate::store::identity::IdentityError;
use crate::store::index::IndexError;
use crate::store::seen::SeenError;
use crate::store::{ObjectError, StoreError};
use crate::vhost::VhostError;

/// A wrong command line found by the CLI itself after clap (a config file with an unknown
/// key, a value of the wrong type or a secret in it; a required option given nowhere).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What kind of failure ended a command; decides the exit code and the `"kind"` of a
/// `--json` error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Anything not listed below.
    Other,
    /// The command line is wrong (unknown option, options that do not go together, a bad
    /// value such as an unusable URL or chunk size).
    Usage,
    /// The disk (or a socket) is in use by another process.
    InUse,
    /// The disk's migration state does not allow the operation (not prepared, not
    /// confirmed, already committed, ...).
    InvalidState,
    /// The remote source or a control socket could not be reached or answered wrongly.
    Network,
    /// Data failed verification: a chunk or index hash or signature, corrupted metadata,
    /// an image that changed on the server.
    Integrity,
    /// Local I/O failed (a missing file, a read or write error, permissions).
    Io,
}

/// Every kind in exit-code order, for the help text and the tests.
pub const ALL: [Kind; 7] = [
    Kind::Other,
    Kind::Usage,
    Kind::InUse,
    Kind::InvalidState,
    Kind::Network,
    Kind::Integrity,
    Kind::Io,
];

impl Kind {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            Kind::Other => 1,
            Kind::Usage => 2,
            Kind::InUse => 3,
            Kind::InvalidState => 4,
            Kind::Network => 5,
            Kind::Integrity => 6,
            Kind::Io => 7,
        }
    }

    /// The `"kind"` of a `--json` error.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "other",
            Kind::Usage => "usage",
            Kind::InUse => "in_use",
            Kind::InvalidState => "invalid_state",
            Kind::Network => "network",
            Kind::Integrity => "integrity",
            Kind::Io => "io",
        }
    }

    fn summary(self) -> &'static str {
        match self {
            Kind::Other => "any other error",
            Kind::Usage => "usage: wrong command line or option value",
            Kind::InUse => "disk or socket in use by another process",
            Kind::InvalidState => "the disk's state does not allow the operation",
            Kind::Network => "remote source or control socket unreachable or failing",
            Kind::Integrity => "verification failed (hash, signature, metadata, changed image)",
            Kind::Io => "local I/O error",
        }
    }
}

/// The exit-code table shown at the end of `streamboot --help`.
pub fn help_table() -> String {
    let mut t = String::from("Exit codes (`--json` errors name the kind):\n  0  success\n");
    for k in ALL {
        t.push_str(&format!(
            "  {}  {:<14} {}\n",
            k.code(),
            k.name(),
            k.summary()
        ));
    }
    t
}

/// The kind of `e`: the first error along its cause chain (outermost first) that says
/// something specific; [`Kind::Other`] when none does.
pub fn classify(e: &anyhow::Error) -> Kind {
    e.chain().find_map(one).unwrap_or(Kind::Other)
}

/// The kind one error in a chain stands for; `None` for a wrapper whose cause decides.
fn one(e: &(dyn Error + 'static)) -> Option<Kind> {
    macro_rules! try_as {
        ($($t:ty => $f:expr),* $(,)?) => {
            $(if let Some(x) = e.downcast_ref::<$t>() { return $f(x); })*
        };
    }
    try_as!(
        UsageError => |_| Some(Kind::Usage),
        MigrationError => migration,
        StepError => step,
        RelocError => |x| Some(reloc(x)),
        SourceError => source,
        crate::net::NetError => |x| Some(net(x)),
        crate::net::s3::S3Error => |x| Some(s3(x)),
        CacheError => cache,
        ServiceError => service,
        EngineError => engine,
        BlockError => block,
        SeedError => seed,
        StoreError => store,
        IndexError => |_| Some(Kind::Integrity),
        ObjectError => |_| Some(Kind::Integrity),
        IdentityError => |_| Some(Kind::Integrity),
        SeenError => seen,
        Conflict => |_| Some(Kind::InvalidState),
        ClientError => client,
        BindError => bind,
        VhostError => vhost,
        DaemonError => daemon,
        BenchError => bench,
        io::Error => |x: &io::Error| Some(io_kind(x)),
    );
    None
}

fn bench(e: &BenchError) -> Option<Kind> {
    match e {
        BenchError::Usage(_) | BenchError::NotBuiltIn | BenchError::Profile(_) => Some(Kind::Usage),
        BenchError::Origin { .. } => Some(Kind::Network),
        _ => None,
    }
}

fn migration(e: &MigrationError) -> Option<Kind> {
    match e {
        MigrationError::Conflict { .. }
        | MigrationError::NotPrepared { .. }
        | MigrationError::OtherTarget => Some(Kind::InvalidState),
        MigrationError::Usage(_) => Some(Kind::Usage),
        MigrationError::ChunkSize(r) => Some(reloc(r)),
        MigrationError::Engine(x) => engine(x),
        MigrationError::Open { .. }
        | MigrationError::Read { .. }
        | MigrationError::Target { .. }
        | MigrationError::Plan { .. }
        | MigrationError::Step { .. } => None,
    }
}

fn step(e: &StepError) -> Option<Kind> {
    match e {
        StepError::Reloc(x) => Some(reloc(x)),
        StepError::Engine(x) => engine(x),
        StepError::Seed(x) => seed(x),
        StepError::Profile(_) => None,
        StepError::Key(x) => store(x),
        StepError::Fetch(_) => Some(Kind::Network),
        StepError::Io(x) => Some(io_kind(x)),
    }
}

fn reloc(e: &RelocError) -> Kind {
    match e {
        RelocError::Io { source, .. } | RelocError::HostKey { source, .. } => io_kind(source),
        RelocError::NotPrepared | RelocError::AlreadyPrepared(_) | RelocError::BadState { .. } => {
            Kind::InvalidState
        }
        RelocError::Corrupt(_) | RelocError::PartitionTable(_) => Kind::Integrity,
        RelocError::InvalidChunkSize(_) | RelocError::Invalid(_) => Kind::Usage,
        RelocError::Fetch { .. } => Kind::Network,
        RelocError::TooSmall(_) | RelocError::Overlap(_) => Kind::Other,
    }
}

fn source(e: &SourceError) -> Option<Kind> {
    Some(match e {
        SourceError::Net(n) => net(n),
        SourceError::NoRangeSupport { .. } | SourceError::Unvalidated { .. } => Kind::Network,
        SourceError::Changed { .. } | SourceError::Verify { .. } => Kind::Integrity,
        SourceError::Invalid(_) => Kind::Usage,
        SourceError::Io(x) => io_kind(x),
        SourceError::OutOfRange { .. } | SourceError::Cancelled => Kind::Other,
        // The cause decides.
        SourceError::Cache(x) => return cache(x),
    })
}

fn cache(e: &CacheError) -> Option<Kind> {
    Some(match e {
        CacheError::Io { source, .. } => io_kind(source),
        CacheError::NotOwned { .. } | CacheError::NotADirectory { .. } | CacheError::ZeroSize => {
            Kind::Usage
        }
    })
}

fn net(e: &crate::net::NetError) -> Kind {
    use crate::net::NetError as N;
    match e {
        N::Invalid(_) | N::NotFound { http: false, .. } => Kind::Usage,
        N::Io(x) => io_kind(x),
        N::S3(x) => s3(x),
        _ => Kind::Network,
    }
}

fn s3(e: &crate::net::s3::S3Error) -> Kind {
    use crate::net::s3::S3Error as E;
    match e {
        E::BadUrl(_) | E::Config(_) => Kind::Usage,
        E::NoStaticKeys(inner) => s3(inner),
        E::Credentials { .. }
        | E::AccessDenied { .. }
        | E::NoSuchObject { .. }
        | E::NoSuchBucket { .. }
        | E::Unreachable { .. }
        | E::Request { .. } => Kind::Network,
    }
}

fn service(e: &ServiceError) -> Option<Kind> {
    match e {
        ServiceError::Conflict(_)
        | ServiceError::Transition(_)
        | ServiceError::InterruptedPrepare { .. } => Some(Kind::InvalidState),
        ServiceError::InUse { .. } => Some(Kind::InUse),
        ServiceError::Engine(x) => engine(x),
        ServiceError::Reloc(x) => Some(reloc(x)),
        ServiceError::Source(x) => source(x),
        ServiceError::Io(x) => Some(io_kind(x)),
        ServiceError::Block(x) => block(x),
        ServiceError::Profile(_) => None,
    }
}

fn engine(e: &EngineError) -> Option<Kind> {
    match e {
        EngineError::Reloc(x) => Some(reloc(x)),
        EngineError::Block(x) => block(x),
        EngineError::State(_) => Some(Kind::InvalidState),
        EngineError::Mismatch(_) => Some(Kind::Integrity),
    }
}

fn block(e: &BlockError) -> Option<Kind> {
    match e {
        BlockError::Remote(_) => Some(Kind::Network),
        BlockError::Io(x) => Some(io_kind(x)),
        BlockError::Unavailable(_) => Some(Kind::InvalidState),
        BlockError::OutOfRange { .. }
        | BlockError::ReadOnly
        | BlockError::Unsupported(_)
        | BlockError::NoSpace
        | BlockError::Cancelled => Some(Kind::Other),
    }
}

fn seed(e: &SeedError) -> Option<Kind> {
    match e {
        SeedError::ChunkSize { .. } => Some(Kind::Usage),
        SeedError::State(_) => Some(Kind::InvalidState),
        SeedError::NotPinned => Some(Kind::Integrity),
        SeedError::Reloc(x) => Some(reloc(x)),
    }
}

fn store(e: &StoreError) -> Option<Kind> {
    match e {
        StoreError::Io { source, .. } => Some(io_kind(source)),
        StoreError::BadName(_) | StoreError::BadChunkSize(_) | StoreError::NoSuchImage(_) => {
            Some(Kind::Usage)
        }
        StoreError::Index { .. } | StoreError::BadObject { .. } => Some(Kind::Integrity),
        StoreError::VersionNotNewer { .. } => Some(Kind::InvalidState),
        StoreError::Key { .. } | StoreError::TooLarge { .. } | StoreError::Unnumbered { .. } => {
            Some(Kind::Other)
        }
        StoreError::Remote(x) => Some(net(x)),
    }
}

fn seen(e: &SeenError) -> Option<Kind> {
    match e {
        SeenError::Io { source, .. } => Some(io_kind(source)),
        SeenError::Format { .. } | SeenError::Identity(_) => Some(Kind::Integrity),
    }
}

fn client(e: &ClientError) -> Option<Kind> {
    match e {
        ClientError::Api { status: 409, .. } => Some(Kind::InvalidState),
        ClientError::Api { status: 400, .. } => Some(Kind::Usage),
        ClientError::Api { .. } => Some(Kind::Other),
        ClientError::PermissionDenied { .. } => Some(Kind::Io),
        _ => Some(Kind::Network),
    }
}

fn bind(e: &BindError) -> Option<Kind> {
    match e {
        BindError::InUse(_) => Some(Kind::InUse),
        _ => None,
    }
}

fn vhost(e: &VhostError) -> Option<Kind> {
    match e {
        VhostError::SocketInUse(_) => Some(Kind::InUse),
        VhostError::InvalidOptions(_) | VhostError::UnknownGroup(_) => Some(Kind::Usage),
        VhostError::Io(x) => Some(io_kind(x)),
        VhostError::Flush(x) => block(x),
        _ => None,
    }
}

fn daemon(e: &DaemonError) -> Option<Kind> {
    match e {
        DaemonError::Vhost(x) => vhost(x),
        _ => None,
    }
}

/// A busy block device (opened `O_EXCL` elsewhere) is in use; any other I/O error is I/O.
fn io_kind(e: &io::Error) -> Kind {
    if e.raw_os_error() == Some(libc::EBUSY) {
        Kind::InUse
    } else {
        Kind::Io
    }
}
