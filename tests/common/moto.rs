//! A real S3-compatible server for the tests: moto's server mode (PyPI `moto[server]`,
//! installed into /opt/streamboot-test/moto-venv by vm-tests/setup.sh), one per test on a
//! free loopback port, with request signatures checked.
//!
//! moto checks signatures (and IAM permissions) once its "initial no-auth action count" is
//! used up. The server starts with that count unlimited, an IAM user with an allow-all
//! policy, an access key and bucket `bkt` are created, and the count is set to 0
//! (`POST /moto-api/reset-auth`): from then on every request must be signed with that key.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::serve::Served;

/// The virtualenv holding moto.
pub const VENV: &str = "/opt/streamboot-test/moto-venv";

/// The bucket every server starts with.
pub const BUCKET: &str = "bkt";

const SETUP: &str = r#"
import json, sys, boto3
ep = sys.argv[1]
kw = dict(endpoint_url=ep, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="streamboot")
iam.put_user_policy(UserName="streamboot", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="streamboot")["AccessKey"]
boto3.client("s3", **kw).create_bucket(Bucket=sys.argv[2])
print(key["AccessKeyId"])
print(key["SecretAccessKey"])
"#;

const PUT: &str = r#"
import sys, boto3
ep, bucket, key, path = sys.argv[1:5]
boto3.client("s3", endpoint_url=ep, region_name="us-east-1").upload_file(path, bucket, key)
"#;

const GET: &str = r#"
import sys, boto3
ep, bucket, key = sys.argv[1:4]
body = boto3.client("s3", endpoint_url=ep, region_name="us-east-1").get_object(Bucket=bucket, Key=key)["Body"]
sys.stdout.buffer.write(body.read())
"#;

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    port: u16,
    /// Access key id of the IAM user (a secret the tests look for in outputs).
    pub key_id: String,
    /// Its secret access key.
    pub secret: String,
    /// An empty HOME for the commands run here (no ~/.aws of the machine).
    home: tempfile::TempDir,
}

impl Moto {
    /// Starts moto with signature checking on, user, key and bucket [`BUCKET`] made.
    pub fn start() -> Moto {
        let server = Path::new(VENV).join("bin/moto_server");
        assert!(
            server.exists(),
            "{} missing: run vm-tests/setup.sh (installs moto[server])",
            server.display()
        );
        let port = super::dead_port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "1000000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let mut moto = Moto {
            child,
            port,
            key_id: String::new(),
            secret: String::new(),
            home: tempfile::tempdir().unwrap(),
        };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "moto did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = moto.python(SETUP, &[&moto.endpoint(), BUCKET], &[]);
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        moto.key_id = lines.next().expect("access key id").to_owned();
        moto.secret = lines.next().expect("secret key").to_owned();
        moto.enforce_auth();
        moto
    }

    /// From now on, every request must be signed with a known key.
    fn enforce_auth(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST /moto-api/reset-auth HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\
             Content-Length: 1\r\nConnection: close\r\n\r\n0"
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "reset-auth: {answer}");
    }

    fn python(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = Command::new(Path::new(VENV).join("bin/python"))
            .arg("-c")
            .arg(script)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Uploads `data` as `key` of [`BUCKET`] (signed with the user's key).
    pub fn put(&self, key: &str, data: &[u8]) {
        let f = self.home.path().join("upload.tmp");
        std::fs::write(&f, data).unwrap();
        let keys = [
            ("AWS_ACCESS_KEY_ID", self.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
        ];
        let ep = self.endpoint();
        self.python(PUT, &[&ep, BUCKET, key, f.to_str().unwrap()], &keys);
        std::fs::remove_file(f).unwrap();
    }

    /// The object `key` of [`BUCKET`].
    pub fn get(&self, key: &str) -> Vec<u8> {
        let keys = [
            ("AWS_ACCESS_KEY_ID", self.key_id.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.as_str()),
        ];
        self.python(GET, &[&self.endpoint(), BUCKET, key], &keys)
            .stdout
    }

    /// The streamboot binary with the user's keys in its environment (`secret` replaces
    /// the secret key: `Some("wrong")` signs with a wrong one), a HOME of its own and no
    /// other `AWS_*` variable of the test's environment.
    pub fn command_with_secret(&self, secret: &str) -> Command {
        let mut c = self.command_without_keys();
        c.env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret);
        c
    }

    /// The streamboot binary with a HOME of its own and no `AWS_*` variable.
    pub fn command_without_keys(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_streamboot"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                c.env_remove(k);
            }
        }
        c.env("HOME", self.home.path());
        c
    }

    /// [`Self::command_with_secret`] with the right secret.
    pub fn command(&self) -> Command {
        self.command_with_secret(&self.secret)
    }

    /// The options naming this server: `--s3-endpoint URL --s3-path-style`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-path-style".into(),
        ]
    }

    /// `streamboot ARGS` with the keys and [`Self::args`] appended.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .args(self.args())
            .output()
            .expect("run streamboot")
    }

    /// [`Self::cli`] that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "streamboot {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `streamboot serve DISK --socket SOCK EXTRA` with the keys and [`Self::args`]; its
    /// log (debug level) goes to `log`. Waits for the socket.
    pub fn serve(&self, disk: &Path, socket: &Path, log: &Path, extra: &[&str]) -> Served {
        let _ = std::fs::remove_file(socket);
        let child = self
            .command()
            .arg("serve")
            .arg(disk)
            .arg("--socket")
            .arg(socket)
            .arg("--allow-unsealed-memory")
            .args(extra)
            .args(self.args())
            .env("STREAMBOOT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .expect("start serve");
        let mut served = Served {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: Some(PathBuf::from(log)),
        };
        let t = Instant::now();
        while !socket.exists() {
            if let Some(st) = served.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited early: {st:?} {}", served.log());
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{}", served.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        served
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
