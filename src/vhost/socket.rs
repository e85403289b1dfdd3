//! Creation of the listening unix socket with safe permissions.
//!
//! The socket gives full access to the disk, so it is never world-accessible, not even for
//! an instant: it is bound inside a fresh private (0700) directory next to the requested
//! path, its mode (0600, or 0660 with a group) and group are set there, and only then is
//! it hard-linked into place (`link` fails instead of replacing anything that appeared at
//! the path meanwhile). The process umask is left alone (it is shared by all threads).
//!
//! A socket can also be handed over already listening: by systemd socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`, see [`systemd_listener`]) or by a parent process with
//! `serve --fd N` ([`inherited_listener`]). Its owner chose its path and mode.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::VhostError;

/// A listening socket handed to `serve` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    /// `LISTEN_FDS`/`LISTEN_PID` are malformed.
    #[error("socket activation (LISTEN_FDS/LISTEN_PID)")]
    Env(#[source] io::Error),
    /// systemd passed more than one socket.
    #[error("LISTEN_FDS={0}: serve takes exactly one socket (the vhost-user socket)")]
    Count(usize),
    /// fd 0, 1 or 2.
    #[error("fd {0} is stdin, stdout or stderr, not a passed socket (passed sockets start at 3)")]
    Stdio(RawFd),
    /// Not an open file descriptor.
    #[error("fd {fd} is not open")]
    NotOpen {
        /// The descriptor.
        fd: RawFd,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Open, but not what a frontend connects to.
    #[error("fd {fd} is not a listening unix stream socket ({what})")]
    NotListening {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        what: &'static str,
    },
}

/// The vhost-user socket passed by systemd socket activation, if any: `LISTEN_PID` is
/// this process and `LISTEN_FDS` is 1 (the socket is fd 3). `None` when nothing was
/// passed to this process.
pub fn systemd_listener() -> Result<Option<UnixListener>, InheritError> {
    let mut fds = sd_notify::listen_fds().map_err(InheritError::Env)?;
    match fds.len() {
        0 => Ok(None),
        1 => inherited_listener(fds.next().unwrap_or(3)).map(Some),
        n => Err(InheritError::Count(n)),
    }
}

/// Takes ownership of `fd`, a listening unix stream socket handed to this process
/// (`serve --fd N`), after checking that it is one; it is made close-on-exec.
pub fn inherited_listener(fd: RawFd) -> Result<UnixListener, InheritError> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    if (0..=2).contains(&fd) {
        return Err(InheritError::Stdio(fd));
    }
    // SAFETY: F_GETFD on any integer only reads the descriptor table; no memory is passed.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(InheritError::NotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is open (checked just above) and stays open while borrowed: nothing
    // else in this process owns or closes a descriptor handed to `serve`.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let not = |what| InheritError::NotListening { fd, what };
    if sockopt::socket_domain(borrowed).map_err(|_| not("not a socket"))? != AddressFamily::UNIX {
        return Err(not("not a unix socket"));
    }
    if sockopt::socket_type(borrowed).map_err(|_| not("not a socket"))? != SocketType::STREAM {
        return Err(not("not a stream socket"));
    }
    if !sockopt::socket_acceptconn(borrowed).map_err(|_| not("not a socket"))? {
        return Err(not("not listening"));
    }
    rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).map_err(|e| {
        InheritError::NotOpen {
            fd,
            source: e.into(),
        }
    })?;
    // SAFETY: `fd` is an open listening socket handed to this process for `serve` to
    // own (checked above); from here on only the returned listener closes it.
    Ok(UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The path a listening socket is bound to, if it has one (for logs and messages).
pub fn listener_path(listener: &UnixListener) -> Option<PathBuf> {
    listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
}

/// Resolves a group given by name or number.
pub fn resolve_group(group: &str) -> Result<u32, VhostError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| VhostError::UnknownGroup(group.to_string()))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value of this plain C struct.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // Soundness: every pointer is valid for the duration of the call: `name` is a
        // NUL-terminated string, `grp` and `result` are live locals, and `buf` is a live
        // buffer of the length passed. The strings `grp` points to live in `buf`, which we
        // do not read; only `gr_gid` (a plain integer) is used afterwards.
        // SAFETY: sound for the reasons given just above.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return Err(VhostError::UnknownGroup(group.to_string()));
        }
        return Ok(grp.gr_gid);
    }
}

/// Binds a listening socket at `path` with mode 0600, or 0660 and group `gid`.
///
/// A stale socket (nobody accepting) is replaced; a live one, or anything that is not a
/// socket, is refused.
pub fn bind_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, VhostError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(VhostError::SocketInUse(path.to_path_buf()));
            }
            fs::remove_file(path).map_err(|e| VhostError::socket(path, e))?;
        }
        Ok(_) => return Err(VhostError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(VhostError::socket(path, e)),
    }

    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let private = private_dir(&parent).map_err(|e| VhostError::socket(path, e))?;
    let tmp = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&tmp)?;
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid))?;
        }
        fs::hard_link(&tmp, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&private);
    result.map_err(|e| VhostError::socket(path, e))
}

/// Creates a new 0700 directory in `parent` with a short, unused name.
fn private_dir(parent: &Path) -> io::Result<PathBuf> {
    let mut builder = fs::DirBuilder::new();
    builder.mode(0o700);
    for _ in 0..16 {
        let dir = parent.join(format!(".sb{:08x}", rand::random::<u32>()));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "cannot create a private directory for the socket",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn socket_is_private_and_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        let listener = bind_socket(&path, None).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Connecting through the final path reaches the listener.
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
        // A live socket is refused.
        assert!(matches!(
            bind_socket(&path, None),
            Err(VhostError::SocketInUse(_))
        ));
        drop(listener);
        // A stale one is replaced.
        let _listener = bind_socket(&path, None).unwrap();
        // No leftovers next to it.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn group_socket_is_0660_with_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let _listener = bind_socket(&path, Some(gid)).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(resolve_group("no-such-group-streamboot").is_err());
    }

    #[test]
    fn inherited_fd_must_be_a_listening_unix_stream_socket() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.sock");
        assert!(matches!(inherited_listener(1), Err(InheritError::Stdio(1))));
        // Refused descriptors are not taken over (they stay owned here).
        let file = fs::File::create(dir.path().join("f")).unwrap();
        assert!(matches!(
            inherited_listener(file.as_raw_fd()),
            Err(InheritError::NotListening { .. })
        ));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            inherited_listener(a.as_raw_fd()),
            Err(InheritError::NotListening { .. })
        ));
        let listener = UnixListener::bind(&path).unwrap();
        let taken = inherited_listener(listener.into_raw_fd()).unwrap();
        assert_eq!(listener_path(&taken).as_deref(), Some(path.as_path()));
        let _client = UnixStream::connect(&path).unwrap();
        taken.accept().unwrap();
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        fs::write(&path, b"data").unwrap();
        assert!(matches!(
            bind_socket(&path, None),
            Err(VhostError::NotASocket(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"data");
    }
}
