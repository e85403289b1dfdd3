//! A real `streamboot serve` child process for the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `streamboot serve`; killed on drop.
pub struct Served {
    pub child: Option<Child>,
    pub socket: PathBuf,
    /// Where its log (stderr) goes, when not to the test's stderr.
    pub log: Option<PathBuf>,
}

impl Served {
    /// Starts serve on `disk` with `socket` and `extra` arguments; waits for the socket.
    pub fn start(disk: &Path, socket: &Path, extra: &[&str]) -> Served {
        Self::start_logged(disk, socket, None, extra)
    }

    /// Like [`Self::start`], with serve's log in the file `log`.
    pub fn start_logged(disk: &Path, socket: &Path, log: Option<&Path>, extra: &[&str]) -> Served {
        // libblkio, the tests' frontend, maps buffers it does not seal.
        let mut args = vec!["--allow-unsealed-memory"];
        args.extend_from_slice(extra);
        Self::spawn(disk, socket, log, &args)
    }

    /// Starts serve with exactly `extra` (guest memory must be sealed, as by default).
    pub fn start_strict(disk: &Path, socket: &Path, extra: &[&str]) -> Served {
        Self::spawn(disk, socket, None, extra)
    }

    fn spawn(disk: &Path, socket: &Path, log: Option<&Path>, extra: &[&str]) -> Served {
        let _ = std::fs::remove_file(socket);
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("create serve log")),
            None => Stdio::inherit(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
            .arg("serve")
            .arg(disk)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("STREAMBOOT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start serve");
        let mut served = Served {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.map(Path::to_path_buf),
        };
        let t = Instant::now();
        while !socket.exists() {
            if let Some(st) = served.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "serve {} exited before creating its socket: {st:?} {}",
                    disk.display(),
                    served.log()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "serve did not create its socket: {}",
                served.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        served
    }

    /// Its log so far (empty when it logs to the test's stderr).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("serve running").id()
    }

    /// Simulates a crash of the backend (SIGKILL).
    pub fn kill9(mut self) {
        let mut c = self.child.take().expect("serve running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Sends SIGTERM and waits at most `limit` for the exit; panics past it.
    pub fn sigterm_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("serve running");
        // SAFETY: sending a signal to our own child process by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return (st, t.elapsed());
            }
            if t.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                panic!("serve did not exit within {limit:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops with SIGTERM and checks the clean exit and that the socket is gone.
    pub fn stop(mut self) {
        let (st, _) = self.sigterm_within(Duration::from_secs(30));
        assert!(
            st.success(),
            "serve did not exit cleanly on SIGTERM: {st:?}"
        );
        assert!(!self.socket.exists(), "socket left behind");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
