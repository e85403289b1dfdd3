//! A real `streamboot serve` child process for the integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `streamboot serve`; killed on drop.
pub struct Served {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Served {
    /// Starts serve on `disk` with `socket` and `extra` arguments; waits for the socket.
    pub fn start(disk: &Path, socket: &Path, extra: &[&str]) -> Served {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
            .arg("serve")
            .arg(disk)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("STREAMBOOT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start serve");
        let t = Instant::now();
        while !socket.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "serve did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Served {
            child: Some(child),
            socket: socket.to_path_buf(),
        }
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
