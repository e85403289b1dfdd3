//! A real nginx for integration tests: started as the current user on a free loopback port,
//! with its own prefix, config and logs in a temporary directory, stopped on drop.
//!
//! Locations (all serve the same root directory):
//! - `/NAME`: plain static files with `Range`, strong `ETag` and `Last-Modified`.
//! - `/norange/NAME`: `max_ranges 0`, a server that ignores `Range` (answers 200).
//! - `/lmonly/NAME`: no `ETag`, only `Last-Modified`.
//! - `/unpinned/NAME`: neither `ETag` nor `Last-Modified`.
//!
//! The access log records `$bytes_sent $status $connection "$request"` per request, so tests can count
//! how many bytes a component actually downloaded ([`Nginx::bytes_sent_total`]).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// Where the Debian package installs nginx.
pub const NGINX_BIN: &str = "/usr/sbin/nginx";

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// Bytes sent to the client, headers included (`$bytes_sent`).
    pub bytes_sent: u64,
    /// Response status.
    pub status: u16,
    /// Serial number of the connection that carried the request (`$connection`): few
    /// distinct values for many requests means keep-alive works.
    pub connection: u64,
    /// Request line, e.g. `GET /disk.img HTTP/1.1`.
    pub request: String,
}

/// A running nginx. Dropping it kills the server and removes its files.
pub struct Nginx {
    child: Option<Child>,
    port: u16,
    prefix: TempDir,
    root: PathBuf,
    /// Keeps a root created by [`Nginx::start`] alive (None when serving a caller's root).
    _own_root: Option<TempDir>,
    /// Parameters after `listen ADDR:PORT` (e.g. `ssl`) and extra directives of the
    /// server block ([`Nginx::start_custom`]).
    listen_params: String,
    server_extra: String,
}

impl Nginx {
    /// Starts nginx serving a fresh, empty temporary root (fill it with [`Nginx::put`]).
    pub fn start() -> Nginx {
        Nginx::start_custom("", "")
    }

    /// Like [`Nginx::start`], with `listen_params` after the listen address (`ssl` for
    /// HTTPS) and `server_extra` directives (certificates, `if` rules...) in the server
    /// block. With `ssl`, use [`Nginx::https_url`].
    pub fn start_custom(listen_params: &str, server_extra: &str) -> Nginx {
        let root = TempDir::new().expect("create nginx root dir");
        let path = root.path().to_path_buf();
        let mut nginx = Nginx::launch(path, 0, listen_params, server_extra);
        nginx._own_root = Some(root);
        nginx
    }

    /// Starts nginx serving the caller's directory `root` (e.g. two servers as mirrors of
    /// the same files).
    pub fn serve(root: &Path) -> Nginx {
        Nginx::launch(root.to_path_buf(), 0, "", "")
    }

    fn launch(root: PathBuf, port: u16, listen_params: &str, server_extra: &str) -> Nginx {
        assert!(
            Path::new(NGINX_BIN).exists(),
            "nginx not installed: run the test command from README ({NGINX_BIN} is missing; \
             on Debian/Ubuntu: apt-get install -y nginx)"
        );
        let prefix = TempDir::new().expect("create nginx prefix dir");
        let mut nginx = Nginx {
            child: None,
            port,
            prefix,
            root,
            _own_root: None,
            listen_params: listen_params.to_string(),
            server_extra: server_extra.to_string(),
        };
        // A port picked as free can be taken before nginx binds it: try a few.
        let fixed = port != 0;
        for _ in 0..5 {
            if !fixed {
                nginx.port = free_port();
            }
            match nginx.spawn() {
                Ok(()) => return nginx,
                Err(log) if !fixed && log.contains("Address already in use") => continue,
                Err(log) => panic!("nginx failed to start on port {}:\n{log}", nginx.port),
            }
        }
        panic!("nginx: no free loopback port after 5 tries");
    }

    /// Writes the config and starts the process; waits until the port accepts connections.
    /// On failure returns the error log.
    fn spawn(&mut self) -> Result<(), String> {
        let prefix = self.prefix.path();
        for dir in ["logs", "tmp"] {
            fs::create_dir_all(prefix.join(dir)).expect("create nginx dirs");
        }
        let conf = prefix.join("nginx.conf");
        fs::write(&conf, self.config()).expect("write nginx.conf");
        let error_log = prefix.join("logs/error.log");
        let child = Command::new(NGINX_BIN)
            .arg("-p")
            .arg(prefix)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {NGINX_BIN}: {e}"));
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let child = self.child.as_mut().expect("child just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                let mut log = fs::read_to_string(&error_log).unwrap_or_default();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
                }
                self.child = None;
                return Err(format!("exited with {status}\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        Err(format!(
            "not accepting connections after 10 s\n{}",
            fs::read_to_string(&error_log).unwrap_or_default()
        ))
    }

    fn config(&self) -> String {
        let prefix = self.prefix.path().display();
        let root = self.root.display();
        let port = self.port;
        let listen_params = &self.listen_params;
        let server_extra = &self.server_extra;
        format!(
            r#"# generated by tests/common/nginx.rs
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{
    worker_connections 1024;
}}
http {{
    default_type application/octet-stream;
    log_format counted '$bytes_sent $status $connection "$request"';
    access_log {prefix}/logs/access.log counted;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} {listen_params};
        server_name localhost;
        root {root};
        {server_extra}
        location /norange/ {{
            alias {root}/;
            max_ranges 0;
        }}
        location /lmonly/ {{
            alias {root}/;
            etag off;
        }}
        location /unpinned/ {{
            alias {root}/;
            etag off;
            add_header Last-Modified "";
        }}
    }}
}}
"#
        )
    }

    /// The loopback port nginx listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory nginx serves.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// URL of `name` (a path relative to the root, may start with a location such as
    /// `norange/`).
    pub fn url(&self, name: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            name.trim_start_matches('/')
        )
    }

    /// HTTPS URL of `name` (a server started with `ssl`, see [`Nginx::start_custom`]).
    pub fn https_url(&self, name: &str) -> String {
        self.url(name).replacen("http://", "https://", 1)
    }

    /// Writes `data` to `name` under the root (atomically: write then rename, so nginx
    /// never serves a half-written file) and returns its path.
    pub fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let path = self.root.join(name);
        let tmp = self.root.join(format!(".{name}.tmp"));
        fs::write(&tmp, data).expect("write served file");
        fs::rename(&tmp, &path).expect("rename served file");
        path
    }

    /// Replaces `name` with `data` and sets its mtime to `mtime` (nginx's ETag is made of
    /// the mtime in seconds and the size, so a replacement must move the mtime to be seen).
    pub fn replace(&self, name: &str, data: &[u8], mtime: SystemTime) -> PathBuf {
        let path = self.put(name, data);
        set_mtime(&path, mtime);
        path
    }

    /// Parsed access log, in completion order. A request appears once nginx finished it.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text =
            fs::read_to_string(self.prefix.path().join("logs/access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (bytes, rest) = line.split_once(' ')?;
                let (status, rest) = rest.split_once(' ')?;
                let (connection, request) = rest.split_once(' ')?;
                Some(AccessEntry {
                    bytes_sent: bytes.parse().ok()?,
                    status: status.parse().ok()?,
                    connection: connection.parse().ok()?,
                    request: request.trim_matches('"').to_string(),
                })
            })
            .collect()
    }

    /// Total `$bytes_sent` over the access log: what clients downloaded, headers included.
    pub fn bytes_sent_total(&self) -> u64 {
        self.access_log().iter().map(|e| e.bytes_sent).sum()
    }

    /// The error log so far (for assertion messages).
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.prefix.path().join("logs/error.log")).unwrap_or_default()
    }

    /// Stops the server (connections are cut); [`Nginx::restart`] brings it back on the same
    /// port.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again on the same port with the same config (after [`Nginx::stop`]).
    pub fn restart(&mut self) {
        self.kill();
        // The port was ours; after a kill it may linger briefly in the kernel.
        let start = Instant::now();
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(log)
                    if log.contains("Address already in use")
                        && start.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(log) => panic!("nginx failed to restart on port {}:\n{log}", self.port),
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sets the modification time of `path`.
pub fn set_mtime(path: &Path, mtime: SystemTime) {
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
}

/// A loopback port that is free right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}
