//! The demo's VM: the guest kernel + initramfs from `vm-tests/build-guest.sh` (embedded),
//! booted by QEMU (microvm, TCG, memfd shared memory) on the vhost-user-blk socket or on
//! a plain file, with the guest's verdict lines read from its serial console log.
//! Command line as in `vm-tests/lib.sh` (`sb_run_vm`, `boot_vhost`, `boot_plain`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::images::{have, run_script, write_scripts};
use super::DemoError;

/// Guest memory (MiB).
const MEM_MB: u32 = 256;
/// Shared with `vm-tests/lib.sh`: one VM at a time on this machine.
const VM_LOCK: &str = "/tmp/streamboot-vm.lock";

/// Why no VM can run here (None: one can).
pub fn unavailable() -> Option<String> {
    if !have("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    if !have("busybox") {
        return Some("busybox is not installed".into());
    }
    let kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    if !kernel {
        return Some("no guest kernel /boot/vmlinuz-*".into());
    }
    None
}

/// `STREAMBOOT-…` lines in a serial console log.
pub fn console_lines(log: &Path) -> Vec<String> {
    let raw = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| l.find("STREAMBOOT-").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

/// A built guest: kernel and initramfs.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or reuses) the guest in `cache/guest`.
pub fn build_guest(cache: &Path) -> Result<Guest, DemoError> {
    let scripts = cache.join("scripts");
    write_scripts(&scripts)?;
    let out = cache.join("guest");
    std::fs::create_dir_all(&out).map_err(|e| DemoError::io(&out, e))?;
    run_script(
        &scripts,
        "build-guest.sh",
        &[&out],
        &cache.join("build-guest.log"),
    )?;
    let env_path = out.join("guest.env");
    let env = std::fs::read_to_string(&env_path).map_err(|e| DemoError::io(&env_path, e))?;
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(PathBuf::from)
            .ok_or_else(|| DemoError::Guest(format!("{k} missing in {}", env_path.display())))
    };
    Ok(Guest {
        kernel: get("KERNEL")?,
        initrd: get("INITRD")?,
    })
}

/// The disk a VM boots from.
pub enum Disk<'a> {
    /// Through vhost-user-blk on this socket.
    Vhost(&'a Path),
    /// A raw file through QEMU's own virtio-blk.
    Plain(&'a Path),
}

/// A running QEMU, holding the machine-wide VM lock.
pub struct Vm {
    child: Child,
    /// Serial console log.
    pub log: PathBuf,
    _lock: std::fs::File,
}

fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse::<f64>()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

impl Vm {
    /// Starts QEMU on `disk` with `extra` kernel arguments, console to `log`. Waits for a
    /// VM of another process (the shared lock of `vm-tests/lib.sh`) to finish first.
    pub fn start(guest: &Guest, disk: Disk, extra: &str, log: &Path) -> Result<Self, DemoError> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(VM_LOCK)
            .map_err(|e| DemoError::io(Path::new(VM_LOCK), e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| DemoError::io(Path::new(VM_LOCK), e.into()))?;
        let _ = std::fs::remove_file(log);
        let accel = std::env::var("STREAMBOOT_DEMO_ACCEL").unwrap_or_else(|_| "tcg".into());
        let mut cmdline =
            "console=ttyS0 root=/dev/vda1 rw rootfstype=ext4 panic=-1 quiet".to_string();
        if let Some(k) = tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={k}"));
        }
        if !extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", &accel, "-smp", "1", "-m", &format!("{MEM_MB}M")])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={MEM_MB}M,share=on"),
                "-M",
                "microvm,memory-backend=mem,acpi=on",
                "-global",
                "virtio-mmio.force-legacy=false",
            ])
            .arg("-kernel")
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initrd)
            .args(["-append", &cmdline])
            .args(["-chardev", &format!("file,id=ser0,path={}", log.display())])
            .args(["-serial", "chardev:ser0"]);
        match disk {
            Disk::Vhost(sock) => cmd.args([
                "-chardev",
                &format!("socket,id=vu0,path={}", sock.display()),
                "-device",
                "vhost-user-blk,chardev=vu0,num-queues=1",
            ]),
            Disk::Plain(file) => cmd.args([
                "-drive",
                &format!(
                    "if=none,id=d0,format=raw,file={},aio=threads",
                    file.display()
                ),
                "-device",
                "virtio-blk-device,drive=d0",
            ]),
        };
        let qemu_log = log.with_extension("qemu");
        let out = std::fs::File::create(&qemu_log).map_err(|e| DemoError::io(&qemu_log, e))?;
        let err = out.try_clone().map_err(|e| DemoError::io(&qemu_log, e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| DemoError::io(Path::new("qemu-system-x86_64"), e))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
            _lock: lock,
        })
    }

    /// `STREAMBOOT-…` lines the guest printed so far.
    pub fn lines(&self) -> Vec<String> {
        console_lines(&self.log)
    }

    /// Waits until the guest printed a line starting with `prefix`; None when QEMU
    /// exits first or `timeout` passes.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.starts_with(prefix)) {
                return Some(l);
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= end {
                // One last look: the line may have landed just before the exit.
                return self.lines().into_iter().find(|l| l.starts_with(prefix));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for QEMU to exit (killing it after `timeout`); true on a clean exit.
    pub fn wait(mut self, timeout: Duration) -> Result<bool, DemoError> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self
                .child
                .try_wait()
                .map_err(|e| DemoError::io(Path::new("qemu-system-x86_64"), e))?
            {
                return Ok(st.success());
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
