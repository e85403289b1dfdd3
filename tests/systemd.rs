//! Running `serve` as a systemd service (issue 16 point 1), on the real binary. The test
//! plays systemd: it reads `sd_notify` datagrams on its own `NOTIFY_SOCKET`, and hands
//! `serve` a bound listening socket as fd 3 with `LISTEN_FDS`/`LISTEN_PID` (systemd sets
//! `LISTEN_PID` in the child before exec; a `sh` that execs serve does the same here).
//! The units themselves are checked with `systemd-analyze verify` (no systemd runs as
//! PID 1 in the test environment to boot them).

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::blkio_client::Client;

const BIN: &str = env!("CARGO_BIN_EXE_streamboot");
const DISK_SIZE: usize = 4 << 20;

/// A plain disk of random bytes (served as it is).
fn plain_disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    let data = common::random_bytes(16, DISK_SIZE);
    let path = dir.join("disk.img");
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Reads the whole device through libblkio and checks it is `want`.
fn assert_reads(sock: &Path, want: &[u8]) -> Client {
    let mut c = Client::connect(sock, 1, 1 << 20).expect("libblkio connects");
    assert_eq!(c.capacity, want.len() as u64);
    for off in (0..want.len()).step_by(1 << 20) {
        assert_eq!(c.read(off as u64, 0, 1 << 20), 0, "read at {off}");
        assert!(
            c.buf(0..1 << 20) == &want[off..off + (1 << 20)],
            "data at {off}"
        );
    }
    c
}

fn sigterm(child: &Child) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// Waits at most 30 s for the exit.
fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("serve did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test's `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(dir: &Path) -> Self {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self { sock, path }
    }

    /// The next datagram, or `None` within `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        let t = Instant::now();
        let mut buf = [0u8; 4096];
        while t.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// Datagrams up to and including the first holding `line` (panics after 30 s).
    fn until(&self, line: &str, child: &mut Child) -> Vec<String> {
        let mut seen = Vec::new();
        let t = Instant::now();
        loop {
            if let Some(msg) = self.recv(Duration::from_millis(200)) {
                let done = msg.lines().any(|l| l == line);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("serve exited ({st:?}) before sending {line}; got {seen:?}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no {line} within 30 s; got {seen:?}"
            );
        }
    }
}

#[test]
fn ready_once_the_socket_accepts_then_stopping_and_pidfile_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let notify = Notify::new(dir.path());
    let sock = dir.path().join("vhost.sock");
    let pidfile = dir.path().join("serve.pid");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg(&disk)
        .arg("--socket")
        .arg(&sock)
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--allow-unsealed-memory")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("STREAMBOOT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let before = notify.until("READY=1", &mut child);
    // The moment READY=1 arrives a frontend can connect, and the pidfile is in place.
    UnixStream::connect(&sock).expect("socket accepts at READY=1");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", child.id())
    );
    let ready = before.last().unwrap();
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=")),
        "READY=1 comes with a STATUS= line: {ready:?}"
    );
    let c = assert_reads(&sock, &data);
    drop(c);
    sigterm(&child);
    notify.until("STOPPING=1", &mut child);
    assert!(wait_exit(child).success());
    assert!(!pidfile.exists(), "pidfile removed at exit");
    assert!(!sock.exists(), "socket removed at exit");
}

/// Starts `serve ARGS` with `listener` as fd 3 and `env`; `LISTEN_PID` is set to serve's
/// own pid by a `sh` that then execs it (as systemd does between fork and exec).
fn spawn_activated(listener: &UnixListener, args: &[&str], env: &[(&str, &str)]) -> Child {
    spawn_with_fd3(listener.as_raw_fd(), args, env)
}

/// Starts `serve ARGS` (through the `sh` of [`spawn_activated`]) with `fd` as its fd 3.
fn spawn_with_fd3(fd: std::os::fd::RawFd, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .env("STREAMBOOT_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // dup2 onto itself keeps close-on-exec: clear it by hand.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn stderr_of(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    out
}

fn one_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one-line error: {err}");
    err
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let notify = Notify::new(dir.path());
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let disk_arg = disk.to_str().unwrap();
    let notify_path = notify.path.to_str().unwrap().to_string();
    // No --socket: the one systemd passed is used.
    let mut child = spawn_activated(
        &listener,
        &["serve", disk_arg, "--allow-unsealed-memory"],
        &[("LISTEN_FDS", "1"), ("NOTIFY_SOCKET", &notify_path)],
    );
    notify.until("READY=1", &mut child);
    drop(listener);
    let c = assert_reads(&path, &data);
    drop(c);
    // A second frontend after the first left (a VM restart) is served on it too.
    drop(assert_reads(&path, &data));
    sigterm(&child);
    assert!(wait_exit(child).success());
    assert!(
        path.exists(),
        "the passed socket belongs to systemd: left in place"
    );
}

#[test]
fn fd_option_serves_on_an_inherited_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let path = dir.path().join("fd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut child = spawn_activated(
        &listener,
        &[
            "serve",
            disk.to_str().unwrap(),
            "--fd",
            "3",
            "--allow-unsealed-memory",
        ],
        &[],
    );
    drop(listener);
    drop(assert_reads(&path, &data));
    assert!(child.try_wait().unwrap().is_none());
    sigterm(&child);
    assert!(wait_exit(child).success());
}

#[test]
fn passed_sockets_that_cannot_serve_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let disk_arg = disk.to_str().unwrap();
    let path = dir.path().join("x.sock");
    let listener = UnixListener::bind(&path).unwrap();
    // LISTEN_PID of another process: not for us, and there is no --socket.
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", disk_arg])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_PID", "1")
        .stderr(Stdio::piped());
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    assert!(one_line(&out).contains("--socket"), "{out:?}");
    // Two sockets: serve takes exactly one.
    let out = stderr_of(spawn_activated(
        &listener,
        &["serve", disk_arg],
        &[("LISTEN_FDS", "2")],
    ));
    assert!(one_line(&out).contains("LISTEN_FDS"), "{out:?}");
    // fd 3 is not listening: a connected stream socket, a regular file.
    let (a, _b) = UnixStream::pair().unwrap();
    let out = stderr_of(spawn_with_fd3(
        a.as_raw_fd(),
        &["serve", disk_arg, "--fd", "3"],
        &[],
    ));
    assert!(one_line(&out).contains("not listening"), "{out:?}");
    let file = std::fs::File::open(&disk).unwrap();
    let out = stderr_of(spawn_with_fd3(
        file.as_raw_fd(),
        &["serve", disk_arg],
        &[("LISTEN_FDS", "1")],
    ));
    assert!(one_line(&out).contains("not a socket"), "{out:?}");
    // The disk is untouched.
    assert!(std::fs::read(&disk).unwrap() == data);
}

/// Runs serve with a config file holding `toml`; returns the output (expected to fail).
fn serve_config_fails(dir: &Path, toml: &str, extra: &[&str]) -> String {
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve accepted {toml:?}");
    one_line(&out)
}

#[test]
fn config_errors_are_one_line_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let sock = dir.path().join("s.sock");
    let head = format!("disk = {:?}\nsocket = {:?}\n", disk, sock);
    let err = serve_config_fails(dir.path(), &format!("{head}sokcet = \"/x\"\n"), &[]);
    assert!(err.contains("unknown key `sokcet`"), "{err}");
    let err = serve_config_fails(dir.path(), &format!("{head}queues = \"two\"\n"), &[]);
    assert!(err.contains("`queues`") && err.contains("line 3"), "{err}");
    let err = serve_config_fails(dir.path(), &format!("{head}rate = \"9Q\"\n"), &[]);
    assert!(err.contains("`rate`"), "{err}");
    // A net option (flattened into serve's options) is named too.
    let err = serve_config_fails(dir.path(), &format!("{head}min-rate = \"9Q\"\n"), &[]);
    assert!(
        err.contains("`min-rate`") && err.contains("line 3"),
        "{err}"
    );
    // Secrets are not accepted in the file, not even in a form the redaction hides.
    let err = serve_config_fails(
        dir.path(),
        &format!("{head}target = [\"http://user:topsecret@127.0.0.1/x.img\"]\n"),
        &[],
    );
    assert!(
        err.contains("target-file") && !err.contains("topsecret"),
        "{err}"
    );
    let err = serve_config_fails(
        dir.path(),
        &format!("{head}notify = \"http://127.0.0.1/hook?token=topsecret\"\n"),
        &[],
    );
    assert!(
        err.contains("notify-file") && !err.contains("topsecret"),
        "{err}"
    );
    let err = serve_config_fails(
        dir.path(),
        &format!("{head}header = [\"X-Token: topsecret\"]\n"),
        &[],
    );
    assert!(
        err.contains("header-file") && !err.contains("topsecret"),
        "{err}"
    );
    let two = dir.path().join("two.url");
    std::fs::write(&two, "http://127.0.0.1/a\nhttp://127.0.0.1/b\n").unwrap();
    std::fs::set_permissions(&two, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let err = serve_config_fails(dir.path(), &head, &["--notify-file", two.to_str().unwrap()]);
    assert!(err.contains("holds 2 URLs"), "{err}");
    let err = serve_config_fails(dir.path(), "socket = \"/x\"\n", &[]);
    assert!(err.contains("DISK"), "{err}");
    // Nothing was created or changed.
    assert!(!sock.exists());
    assert!(std::fs::read(&disk).unwrap() == data);
}

#[test]
fn command_line_overrides_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let from_file = dir.path().join("file.sock");
    let from_cli = dir.path().join("cli.sock");
    let ctl = dir.path().join("ctl.sock");
    let cfg = dir.path().join("disk.toml");
    let mut f = std::fs::File::create(&cfg).unwrap();
    writeln!(
        f,
        "disk = {disk:?}\nsocket = {from_file:?}\ncontrol = {ctl:?}\nread-only = true\n\
         allow-unsealed-memory = true\nqueues = 2\nconnect-timeout = 3\nmin-rate = \"1M\""
    )
    .unwrap();
    drop(f);
    let notify = Notify::new(dir.path());
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(&from_cli)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("STREAMBOOT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    notify.until("READY=1", &mut child);
    // The command line's socket, the file's control socket and read-only setting.
    assert!(from_cli.exists() && !from_file.exists());
    assert!(ctl.exists());
    let c = Client::connect_with(&from_cli, 2, 1 << 20, true).expect("connects");
    assert!(c.read_only, "read-only from the config file");
    drop(c);
    drop(assert_reads_ro(&from_cli, &data));
    sigterm(&child);
    assert!(wait_exit(child).success());
}

fn assert_reads_ro(sock: &Path, want: &[u8]) -> Client {
    let mut c = Client::connect_with(sock, 1, 1 << 20, true).expect("libblkio connects");
    assert_eq!(c.read(0, 0, 1 << 20), 0);
    assert!(c.buf(0..1 << 20) == &want[..1 << 20]);
    c
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let v = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .expect("systemd-analyze (package systemd; vm-tests/setup.sh installs it)");
    assert!(v.status.success());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd");
    let dir = tempfile::tempdir().unwrap();
    for unit in ["streamboot@.service", "streamboot@.socket"] {
        // The installed path of the binary is this build's (verify checks it exists).
        let text = std::fs::read_to_string(src.join(unit))
            .unwrap()
            .replace("/usr/bin/streamboot", BIN);
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("streamboot@disk1.service"))
        .arg(dir.path().join("streamboot@disk1.socket"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{err}",
        out.status
    );
}

/// The XML blocks of a markdown file.
fn xml_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut cur: Option<String> = None;
    for line in md.lines() {
        match (&mut cur, line.trim()) {
            (None, "```xml") => cur = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                cur = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn libvirt_domain_xml_validates() {
    let md = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/libvirt.md"))
        .unwrap();
    let blocks = xml_blocks(&md);
    assert!(!blocks.is_empty(), "docs/libvirt.md has no xml block");
    let dir = tempfile::tempdir().unwrap();
    for (i, xml) in blocks.iter().enumerate() {
        assert!(xml.contains("<disk type='vhostuser'") && xml.contains("<reconnect enabled='yes'"));
        let f = dir.path().join(format!("domain{i}.xml"));
        std::fs::write(&f, xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&f)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (libvirt-clients, libxml2-utils; vm-tests/setup.sh installs them)");
        assert!(
            out.status.success(),
            "docs/libvirt.md block {i} is not a valid domain: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A schema violation is caught (the check can fail).
    let bad = blocks[0].replace("<reconnect enabled='yes'", "<reconnect enabled='sometimes'");
    let f = dir.path().join("bad.xml");
    std::fs::write(&f, bad).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "virt-xml-validate accepted an invalid domain"
    );
}

#[test]
fn unwritable_pidfile_is_a_one_line_error_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, data) = plain_disk(dir.path());
    let sock = dir.path().join("p.sock");
    let out = Command::new(BIN)
        .arg("serve")
        .arg(&disk)
        .arg("--socket")
        .arg(&sock)
        .arg("--pidfile")
        .arg(dir.path().join("no-such-dir/serve.pid"))
        .env("STREAMBOOT_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(one_line(&out).contains("--pidfile"), "{out:?}");
    assert!(!sock.exists(), "socket removed");
    assert!(std::fs::read(&disk).unwrap() == data);
}

/// A target URL with credentials comes from the file named by `target-file` in the
/// config: serve fetches with them (the proxy answers 403 without), and shows them nowhere.
#[test]
fn target_file_of_the_config_carries_the_credentials() {
    use common::fault_proxy::{Fault, FaultProxy, Rule, When};
    let nginx = common::nginx::Nginx::start();
    let target = common::random_bytes(3, 2 << 20);
    nginx.put("t.img", &target);
    let proxy = FaultProxy::start(nginx.port());
    proxy.set_plan(
        1,
        vec![Rule::new(
            When::Always,
            Fault::Require {
                needles: vec!["authorization: Basic dXNlcjpzZWNyZXQ=".into()],
                status: 403,
            },
        )],
    );
    let secret_url = proxy
        .url("t.img")
        .replacen("http://", "http://user:secret@", 1);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(4, 1 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    common::disk::cli_ok(&[
        "prepare",
        d,
        "--target",
        &secret_url,
        "--chunk-size",
        "65536",
    ]);

    let url_file = dir.path().join("disk.target");
    std::fs::write(
        &url_file,
        format!("# mirror with credentials\n{secret_url}\n"),
    )
    .unwrap();
    let sock = dir.path().join("vu.sock");
    let cfg = dir.path().join("disk.toml");
    std::fs::write(
        &cfg,
        format!(
            "disk = {disk:?}\nsocket = {sock:?}\ntarget-file = [{url_file:?}]\n\
             allow-unsealed-memory = true\nrequest-timeout = 5\n"
        ),
    )
    .unwrap();
    assert!(!std::fs::read_to_string(&cfg).unwrap().contains("secret"));
    let notify = Notify::new(dir.path());
    let log = dir.path().join("serve.log");
    let mut child = Command::new(BIN)
        .args(["-vvv", "serve", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(std::fs::File::create(dir.path().join("serve.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let msgs = notify.until("READY=1", &mut child);
    let mut c = Client::connect(&sock, 1, 1 << 20).expect("libblkio connects");
    assert_eq!(c.capacity, target.len() as u64);
    for off in (0..target.len()).step_by(1 << 20) {
        assert_eq!(c.read(off as u64, 0, 1 << 20), 0, "read at {off}");
        assert!(
            c.buf(0..1 << 20) == &target[off..off + (1 << 20)],
            "data at {off}"
        );
    }
    drop(c);
    sigterm(&child);
    assert!(wait_exit(child).success());
    for text in [
        std::fs::read_to_string(&log).unwrap(),
        std::fs::read_to_string(dir.path().join("serve.out")).unwrap(),
        msgs.join("\n"),
    ] {
        assert!(
            !text.contains("secret") && !text.contains("dXNlcjpzZWNyZXQ"),
            "a secret leaked: {text}"
        );
    }
}
