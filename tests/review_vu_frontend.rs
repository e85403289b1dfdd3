//! Device starts as QEMU produces them, driven by a hand-written vhost-user frontend (the
//! `vhost` crate's `Frontend`) against the real `streamboot serve`: the message sequences
//! libblkio cannot produce (stop/start on one connection, firmware then kernel drivers,
//! GET_VRING_BASE while a start is being decided). From the issue 10 review.

mod common;

use std::path::Path;
use std::time::Duration;

use common::blkio_client::Client;
use common::disk::cli_ok;
use common::nginx::Nginx;
use common::serve::Served;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x4000;
const STATUS: u64 = 0x5000;

/// Guest memory: a shared memfd mapping (the frontend's "userspace address" is the
/// mapping, guest physical addresses start at 0).
struct GuestMem {
    fd: i32,
    ptr: *mut u8,
}

impl GuestMem {
    /// Sealed against growing and shrinking, as QEMU's memory-backend-memfd does.
    fn new() -> GuestMem {
        Self::with_seals(true)
    }

    fn with_seals(sealed: bool) -> GuestMem {
        // SAFETY: plain syscalls on a fresh memfd; the mapping lives as long as the test.
        unsafe {
            let fd = libc::memfd_create(c"guest".as_ptr(), libc::MFD_ALLOW_SEALING);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, MEM as i64), 0);
            if sealed {
                let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
                assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, seals), 0);
            }
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            GuestMem {
                fd,
                ptr: ptr.cast(),
            }
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(gpa as usize), bytes.len())
        }
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), v.as_mut_ptr(), len) }
        v
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        assert!(gpa as usize + 2 <= MEM);
        // SAFETY: in bounds of the mapping; volatile because the backend writes it.
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize).cast::<u16>()) }
    }

    fn uva(&self, gpa: u64) -> u64 {
        self.ptr as u64 + gpa
    }
}

/// What a driver acks: VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES, plus EVENT_IDX for
/// an operating system's driver (firmware drivers do not negotiate it).
fn driver_features(fe: &mut Frontend, os: bool) -> u64 {
    let offered = fe.get_features().unwrap();
    let event_idx = if os { 1 << 29 } else { 0 };
    offered & ((1 << 32) | (1 << 30) | event_idx)
}

/// Connects like QEMU: negotiates REPLY_ACK, sets up ring 0 at position 0 and enables it
/// (a firmware-like driver: no EVENT_IDX).
fn connect_like_qemu(sock: &Path, mem: &GuestMem, kick: &EventFd, call: &EventFd) -> Frontend {
    connect_with_regions(sock, mem, kick, call, &[(0, MEM as u64)])
}

/// [`connect_like_qemu`] with guest memory given as `(guest address, size)` regions of
/// the one memfd (the backend maps each region on its own, so their host addresses are
/// not contiguous even where the guest addresses are).
fn connect_with_regions(
    sock: &Path,
    mem: &GuestMem,
    kick: &EventFd,
    call: &EventFd,
    regions: &[(u64, u64)],
) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).expect("connect");
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ;
    fe.set_protocol_features(want).unwrap();
    let ack = driver_features(&mut fe, false);
    fe.set_features(ack).unwrap();
    let table: Vec<_> = regions
        .iter()
        .map(|&(gpa, size)| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: mem.uva(gpa),
            mmap_offset: gpa,
            mmap_handle: mem.fd,
        })
        .collect();
    fe.set_mem_table(&table).unwrap();
    start_ring(&fe, mem, kick, call);
    fe
}

/// A device start as QEMU sends it (docs/architecture.md): ring 0 at position 0, enabled.
/// The driver's ring memory is fresh (a reset zeroed it).
fn start_ring(fe: &Frontend, mem: &GuestMem, kick: &EventFd, call: &EventFd) {
    start_ring_at(fe, mem, kick, call, 0);
}

/// A device start with ring 0 at position `base` (0: after a reset; otherwise the same
/// driver carrying on, as after a pause or a backend restart).
fn start_ring_at(fe: &Frontend, mem: &GuestMem, kick: &EventFd, call: &EventFd, base: u16) {
    mem.write(AVAIL, &[0u8; 64]);
    mem.write(USED, &[0u8; 256]);
    mem.write(AVAIL + 2, &base.to_le_bytes());
    mem.write(USED + 2, &base.to_le_bytes());
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: mem.uva(DESC),
            used_ring_addr: mem.uva(USED),
            avail_ring_addr: mem.uva(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_kick(0, kick).unwrap();
    fe.set_vring_call(0, call).unwrap();
    let mut fe = fe.clone();
    fe.set_vring_enable(0, true).unwrap();
}

/// A device stop as QEMU sends it at a guest reset: disable, then GET_VRING_BASE.
fn stop_ring(fe: &Frontend) {
    let mut fe = fe.clone();
    fe.set_vring_enable(0, false).unwrap();
    fe.get_vring_base(0).unwrap();
}

/// Reads sector 0 through ring 0 (fresh ring: avail idx 1) and returns the 4 KiB read.
fn read_sector0(mem: &GuestMem, kick: &EventFd) -> Vec<u8> {
    submit_read(mem, kick);
    let t = std::time::Instant::now();
    while mem.read_u16(USED + 2) != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "read never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    mem.read(DATA, 4096)
}

/// Puts one 4 KiB read of sector 0 on ring 0 (avail idx 1) and kicks.
fn submit_read(mem: &GuestMem, kick: &EventFd) {
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    let mut table = desc(HDR, 16, 1, 1);
    table.extend(desc(DATA, 4096, 1 | 2, 2));
    table.extend(desc(STATUS, 1, 2, 0));
    mem.write(DESC, &table);
    let mut hdr = [0u8; 16]; // VIRTIO_BLK_T_IN, sector 0
    hdr[8..].copy_from_slice(&0u64.to_le_bytes());
    mem.write(HDR, &hdr);
    mem.write(STATUS, &[0xff]);
    mem.write(AVAIL + 4, &0u16.to_le_bytes()); // ring[0] = head 0
    mem.write(AVAIL, &[0, 0, 1, 0]); // flags 0, idx 1
    kick.write(1).unwrap();
}

/// A source disk prepared for a target on a real nginx (`--boot-range 0..64K` plus
/// `prepare`), the seeds giving source and target bytes.
struct Fixture {
    _nginx: Nginx,
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    source: Vec<u8>,
    target: Vec<u8>,
}

impl Fixture {
    fn new(seed: u64, target_len: usize, prepare: &[&str]) -> Fixture {
        let nginx = Nginx::start();
        let source = common::random_bytes(seed, 3 << 20);
        let target = common::random_bytes(seed + 1, target_len);
        nginx.put("t.img", &target);
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, &source).unwrap();
        let url = nginx.url("t.img");
        let mut args = vec!["prepare", disk.to_str().unwrap(), "--target", &url];
        args.extend_from_slice(prepare);
        args.extend_from_slice(&["--boot-range", "0..64K"]);
        cli_ok(&args);
        Fixture {
            _nginx: nginx,
            dir,
            disk,
            source,
            target,
        }
    }

    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("vu.sock")
    }
}

/// A fresh start of a running VMM process at the trial limit falls back before its first
/// request: that request already reads the source. The capacity the VMM read at its start
/// stays what it sees (the backend cannot announce a change); requests are held to the
/// source's size.
#[test]
fn fallback_at_a_fresh_start_of_a_running_vmm_serves_the_source() {
    let fx = Fixture::new(41, 4 << 20, &["--max-trial-starts", "1"]);
    let (disk, sock, source) = (&fx.disk, fx.sock(), &fx.source);
    let mut srv = Served::start(disk, &sock, &["--no-hydrate"]);
    {
        // Boot 1 uses the only trial start.
        let mut c = Client::connect(&sock, 1, 1 << 16).unwrap();
        assert_eq!(c.read(0, 0, 4096), 0);
    }
    // Boot 2 (same frontend protocol as QEMU): a fresh start at the limit falls back.
    let mem = GuestMem::new();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    let fe = connect_like_qemu(&sock, &mem, &kick, &call);
    let got = read_sector0(&mem, &kick);
    drop(fe);
    srv.sigterm_within(Duration::from_secs(10));
    assert!(got == source[..4096], "the start did not fall back");
}

/// A guest booted by firmware from the disk (SeaBIOS/OVMF driving virtio-blk) makes two
/// fresh device starts per boot: the firmware's (it reads the boot loader, kernel and
/// initrd; no EVENT_IDX) and the kernel's (virtio-blk probe resets the device; EVENT_IDX).
/// Each boot counts once, and a fallback happens at a boot's first (firmware) start, never
/// between its firmware and kernel starts. With the default `--max-trial-starts 3`, boots
/// 1-3 see the target and boot 4 the source, each boot the same contents throughout.
#[test]
fn firmware_boot_never_switches_between_its_firmware_and_kernel_starts() {
    let fx = Fixture::new(51, 3 << 20, &[]);
    let (disk, sock, source, target) = (&fx.disk, fx.sock(), &fx.source, &fx.target);
    let srv = Served::start(disk, &sock, &["--no-hydrate"]);
    let mem = GuestMem::new();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    let mut fe = connect_like_qemu(&sock, &mem, &kick, &call);
    let mut seen = Vec::new();
    for boot in 0..4 {
        for stage in ["firmware", "kernel"] {
            if !(boot == 0 && stage == "firmware") {
                stop_ring(&fe);
                let ack = driver_features(&mut fe, stage == "kernel");
                fe.set_features(ack).unwrap();
                start_ring(&fe, &mem, &kick, &call);
            }
            let got = read_sector0(&mem, &kick);
            let what = if got == target[..4096] {
                "target"
            } else if got == source[..4096] {
                "source"
            } else {
                "neither"
            };
            eprintln!("boot {boot} {stage} start: {what}");
            seen.push((boot, stage, what));
        }
    }
    drop(fe);
    srv.stop();
    for boot in 0..4 {
        let stages: Vec<_> = seen.iter().filter(|s| s.0 == boot).collect();
        assert_eq!(
            stages[0].2, stages[1].2,
            "boot {boot}: the firmware read the {} but the kernel the {} ({seen:?})",
            stages[0].2, stages[1].2
        );
        let want = if boot < 3 { "target" } else { "source" };
        assert_eq!(stages[0].2, want, "boot {boot} ({seen:?})");
    }
}

/// A kick the worker already took from epoll when the frontend stops the ring
/// (`GET_VRING_BASE`: a VM pause, snapshot, migration, or a reset) must start nothing
/// (regression: it was classified after the stop, saw no ready ring and counted a fresh
/// start; at the limit a fallback under the running guest).
///
/// Here the driver only ever pauses and resumes (every start has ring position 5, a
/// resumed start) while a thread keeps kicking; no start may be counted.
fn pause_resume_under_kicks(qemu_order: bool) {
    let fx = Fixture::new(61, 3 << 20, &["--max-trial-starts", "250"]);
    let (disk, sock) = (&fx.disk, fx.sock());
    let srv = Served::start(disk, &sock, &["--no-hydrate"]);
    let mem = GuestMem::new();
    let kick = std::sync::Arc::new(EventFd::new(0).unwrap());
    let call = EventFd::new(0).unwrap();
    let mut fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ,
    )
    .unwrap();
    fe.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: mem.uva(0),
        mmap_offset: 0,
        mmap_handle: mem.fd,
    }])
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kicker = {
        let (kick, stop) = (kick.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = kick.write(1);
                std::hint::spin_loop();
            }
        })
    };
    let t = std::time::Instant::now();
    let mut cycles = 0;
    while t.elapsed() < Duration::from_secs(8) {
        start_ring_at(&fe, &mem, &kick, &call, 5);
        std::thread::sleep(Duration::from_micros(200));
        // Pause: the ring stops. QEMU sends SET_VRING_ENABLE 0 first; the spec does not
        // require it (GET_VRING_BASE stops the ring).
        if qemu_order {
            fe.set_vring_enable(0, false).unwrap();
        }
        assert_eq!(fe.get_vring_base(0).unwrap(), 5);
        cycles += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    kicker.join().unwrap();
    drop(fe);
    srv.stop();
    let out = cli_ok(&["--json", "status", disk.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    eprintln!("{cycles} pause/resume cycles; status {v}");
    assert!(
        v["status"]["state"] == "prepared" && v["status"]["start_counter"] == 0,
        "pause/resume cycles counted as fresh trial starts (or fell back): {v}"
    );
}

#[test]
fn a_stop_racing_a_kick_is_never_a_fresh_start() {
    pause_resume_under_kicks(false);
}

/// The same with QEMU's exact stop order (`SET_VRING_ENABLE 0`, then `GET_VRING_BASE`):
/// the window is narrower (between the worker's `read_kick` and the start gate).
#[test]
fn a_stop_racing_a_kick_is_never_a_fresh_start_qemu_order() {
    pause_resume_under_kicks(true);
}

/// Guest memory a frontend could truncate under the backend (SIGBUS) is refused at
/// SET_MEM_TABLE unless `--allow-unsealed-memory`; sealed memory (as QEMU's memfd backend
/// provides) is served, and the kernel then refuses to shrink it.
#[test]
fn unsealed_guest_memory_is_refused_and_sealed_memory_served() {
    let fx = Fixture::new(71, 3 << 20, &[]);
    let (disk, sock, target) = (&fx.disk, fx.sock(), &fx.target);
    let srv = Served::start_strict(disk, &sock, &["--no-hydrate"]);
    {
        let mem = GuestMem::with_seals(false);
        let mut fe = Frontend::connect(&sock, 1).expect("connect");
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ,
        )
        .unwrap();
        let ack = driver_features(&mut fe, true);
        fe.set_features(ack).unwrap();
        let r = fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: mem.uva(0),
            mmap_offset: 0,
            mmap_handle: mem.fd,
        }]);
        // Refused: an error reply, or the backend ends the connection.
        let refused = r.is_err() || fe.get_features().is_err();
        assert!(refused, "unsealed guest memory was accepted");
    }
    // The backend lives on; a frontend with sealed memory is served.
    let mem = GuestMem::new();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    let fe = connect_like_qemu(&sock, &mem, &kick, &call);
    assert!(read_sector0(&mem, &kick) == target[..4096]);
    // SAFETY: ftruncate on our own memfd; the seal makes the kernel refuse it.
    let shrink = unsafe { libc::ftruncate(mem.fd, 4096) };
    assert_ne!(shrink, 0, "a sealed memfd could be shrunk");
    drop(fe);
    srv.stop();
}

/// Where guest memory splits into two regions in the segment tests.
const SPLIT: u64 = (MEM / 2) as u64;

/// Runs one request of `kind` (0 read, 1 write) at `sector` with data segments `segs`
/// (guest address, length) as descriptor `n` of a fresh ring (avail idx `n`), waits for it
/// and returns its status byte.
fn segmented_request(
    mem: &GuestMem,
    kick: &EventFd,
    n: u16,
    kind: u32,
    sector: u64,
    segs: &[(u64, u32)],
) -> u8 {
    assert!(segs.len() + 2 <= QSIZE as usize);
    let flag = if kind == 0 { 2 } else { 0 }; // VIRTQ_DESC_F_WRITE for a read's data
    let mut table = Vec::new();
    let mut push = |addr: u64, len: u32, flags: u16, next: u16| {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    };
    push(HDR, 16, 1, 1);
    for (i, &(gpa, len)) in segs.iter().enumerate() {
        push(gpa, len, 1 | flag, i as u16 + 2);
    }
    push(STATUS, 1, 2, 0);
    mem.write(DESC, &table);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&kind.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write(HDR, &hdr);
    mem.write(STATUS, &[0xff]);
    mem.write(AVAIL + 4 + 2 * u64::from(n % QSIZE), &0u16.to_le_bytes());
    mem.write(AVAIL + 2, &(n + 1).to_le_bytes());
    kick.write(1).unwrap();
    let t = std::time::Instant::now();
    while mem.read_u16(USED + 2) != n + 1 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "request {n} never completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    mem.read(STATUS, 1)[0]
}

/// `total` bytes of segments of the cycling `lens`, laid out from guest address `start`
/// with a gap after each; asserts one of them crosses the region split.
fn segments(total: usize, start: u64, lens: &[usize]) -> Vec<(u64, u32)> {
    let (mut out, mut left, mut gpa) = (Vec::new(), total, start);
    for &l in lens.iter().cycle() {
        if left == 0 {
            break;
        }
        let n = l.min(left);
        out.push((gpa, n as u32));
        gpa += n as u64 + 192;
        left -= n;
    }
    assert!(gpa <= MEM as u64, "segments run past guest memory");
    assert!(
        out.iter()
            .any(|&(g, l)| g < SPLIT && g + u64::from(l) > SPLIT),
        "no segment crosses the region boundary"
    );
    out
}

/// Multi-segment reads and writes through a two-region memory table: segments of odd
/// sizes, one crossing the region boundary, requests crossing chunk boundaries (missing,
/// fetched, slotted, whole- and partial-chunk writes). Every byte is compared with a
/// reference copy of the image.
fn segmented_io_matches_reference(disk: &Path, sock: &Path, reference: &mut [u8], extra: &[&str]) {
    let srv = Served::start_strict(disk, sock, extra);
    let mem = GuestMem::new();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let regions = [(0, SPLIT), (SPLIT, SPLIT)];
    let fe = connect_with_regions(sock, &mem, &kick, &call, &regions);
    let chunk = 64usize << 10;
    let mut rng = 7u64;
    // (write?, device offset, length, first guest address, segment lengths)
    let plan: [(bool, usize, usize, u64, &[usize]); 6] = [
        (
            false,
            chunk - 1536,
            150 << 10,
            SPLIT - 70_000,
            &[3000, 1, 40_000, 517, 65_536],
        ),
        (
            true,
            5 * chunk - 4096,
            chunk + 8192,
            SPLIT - 3000,
            &[4000, 70_000, 5],
        ),
        (
            false,
            3 * chunk + 512,
            300 << 10,
            SPLIT - 200_000,
            &[65_536, 1000, 99_999],
        ),
        (true, 2 * chunk + 1024, 2048, SPLIT - 1024, &[1500, 548]),
        (
            false,
            0,
            400 << 10,
            SPLIT - 300_000,
            &[131_072, 12_345, 4096],
        ),
        (
            false,
            5 * chunk - 8192,
            2 * chunk,
            SPLIT - 9,
            &[10, 131_062],
        ),
    ];
    for (n, &(write, off, len, start, lens)) in plan.iter().enumerate() {
        let segs = segments(len, start, lens);
        if write {
            let mut data = Vec::new();
            for &(gpa, l) in &segs {
                let bytes: Vec<u8> = (0..l)
                    .map(|_| {
                        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                        (rng >> 56) as u8
                    })
                    .collect();
                mem.write(gpa, &bytes);
                data.extend(bytes);
            }
            let status = segmented_request(&mem, &kick, n as u16, 1, (off / 512) as u64, &segs);
            assert_eq!(status, 0, "write {n} failed");
            reference[off..off + len].copy_from_slice(&data);
        } else {
            for &(gpa, l) in &segs {
                mem.write(gpa, &vec![0xEE; l as usize]);
            }
            let status = segmented_request(&mem, &kick, n as u16, 0, (off / 512) as u64, &segs);
            assert_eq!(status, 0, "read {n} failed");
            let mut got = Vec::new();
            for &(gpa, l) in &segs {
                got.extend(mem.read(gpa, l as usize));
            }
            let same = got == reference[off..off + len];
            assert!(same, "read {n} ({off}+{len}) differs from the reference");
        }
    }
    drop(fe);
    srv.stop();
}

/// The engine path: a prepared disk streaming its target (no hydration: chunks are
/// missing until read), so reads mix fetched and local chunks.
#[test]
fn multi_segment_requests_across_chunks_and_memory_regions_engine() {
    let fx = Fixture::new(81, 3 << 20, &[]);
    let mut reference = fx.target.clone();
    segmented_io_matches_reference(&fx.disk, &fx.sock(), &mut reference, &["--no-hydrate"]);
}

/// The plain path: a disk that was never prepared is served as it is (one vectored
/// syscall per request).
#[test]
fn multi_segment_requests_across_chunks_and_memory_regions_plain() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    let mut reference = common::random_bytes(91, 2 << 20);
    std::fs::write(&disk, &reference).unwrap();
    segmented_io_matches_reference(&disk, &dir.path().join("vu.sock"), &mut reference, &[]);
    // Writes reached the file itself.
    assert!(
        std::fs::read(&disk).unwrap() == reference,
        "file differs from the reference"
    );
}

/// Puts request `n` (avail idx `n + 1`) whose head is descriptor 0 of `table` (raw 16-byte
/// descriptors already laid out by the caller) and waits; `None` when it never completes.
fn raw_request(mem: &GuestMem, kick: &EventFd, n: u16, table: &[u8]) -> Option<u8> {
    mem.write(DESC, table);
    mem.write(STATUS, &[0xff]);
    mem.write(AVAIL + 4 + 2 * u64::from(n % QSIZE), &0u16.to_le_bytes());
    mem.write(AVAIL + 2, &(n + 1).to_le_bytes());
    kick.write(1).unwrap();
    let t = std::time::Instant::now();
    while mem.read_u16(USED + 2) != n + 1 {
        if t.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(mem.read(STATUS, 1)[0])
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// Data descriptors of a request: (guest address, length).
type Segments = Vec<(u64, u32)>;

/// Hostile descriptor chains (segments past the end of guest memory or wrapping the
/// address space, zero-length segments, an indirect table of more than 1024 segments)
/// each get an error status (or, for harmless zero-length segments, the right data),
/// change nothing on disk, and leave the device serving the next good request.
#[test]
fn hostile_descriptor_chains_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    let image = common::random_bytes(95, 2 << 20);
    std::fs::write(&disk, &image).unwrap();
    let sock = dir.path().join("vu.sock");
    let srv = Served::start_strict(&disk, &sock, &[]);
    let mem = GuestMem::new();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let fe = connect_with_regions(&sock, &mem, &kick, &call, &[(0, SPLIT), (SPLIT, SPLIT)]);
    let (next, wr, ind) = (1u16, 2u16, 4u16);
    let header = |kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let hdr = header(0, 0);
    let mem_end = MEM as u64;
    // (name, request type, data descriptors as (addr, len))
    let hostile: [(&str, u32, Segments); 5] = [
        (
            "read past the end of memory",
            0,
            vec![(mem_end - 512, 1024)],
        ),
        (
            "write from past the end of memory",
            1,
            vec![(mem_end - 512, 1024)],
        ),
        (
            "read into a wrapping address",
            0,
            vec![(u64::MAX - 255, 512)],
        ),
        (
            "write from a wrapping address",
            1,
            vec![(u64::MAX - 255, 512)],
        ),
        (
            "read at the very end of region 0 plus one",
            0,
            vec![(SPLIT - 1, 2), (mem_end, 510)],
        ),
    ];
    let mut n = 0u16;
    let good_read = |n: u16| -> (Option<u8>, Vec<u8>) {
        mem.write(HDR, &header(0, 8));
        mem.write(DATA, &[0xEE; 4096]);
        let mut t = desc(HDR, 16, next, 1);
        t.extend(desc(DATA, 4096, next | wr, 2));
        t.extend(desc(STATUS, 1, wr, 0));
        (raw_request(&mem, &kick, n, &t), mem.read(DATA, 4096))
    };
    for (name, kind, segs) in &hostile {
        mem.write(HDR, &header(*kind, 0));
        let mut t = desc(HDR, 16, next, 1);
        for (i, &(a, l)) in segs.iter().enumerate() {
            let f = if *kind == 0 { next | wr } else { next };
            t.extend(desc(a, l, f, i as u16 + 2));
        }
        t.extend(desc(STATUS, 1, wr, 0));
        let st = raw_request(&mem, &kick, n, &t);
        assert!(matches!(st, Some(s) if s != 0), "{name}: status {st:?}");
        n += 1;
        let (st, data) = good_read(n);
        assert_eq!(st, Some(0), "after {name}: the next good read failed");
        assert!(data == image[4096..8192], "after {name}: wrong data");
        n += 1;
    }
    // Zero-length segments around a real one: harmless, the data is right.
    mem.write(HDR, &hdr);
    mem.write(DATA, &[0xEE; 512]);
    let mut t = desc(HDR, 16, next, 1);
    t.extend(desc(DATA + 1024, 0, next | wr, 2));
    t.extend(desc(DATA, 512, next | wr, 3));
    t.extend(desc(mem_end + 4096, 0, next | wr, 4));
    t.extend(desc(STATUS, 1, wr, 0));
    let st = raw_request(&mem, &kick, n, &t);
    assert!(st.is_some(), "zero-length segments: no completion");
    if st == Some(0) {
        assert!(
            mem.read(DATA, 512) == image[..512],
            "zero-length segments: wrong data"
        );
    }
    n += 1;
    // An indirect table of 1100 one-sector segments (more than seg_max and than 1024).
    let table_at = 0x10000u64;
    let count = 1100u16;
    let mut it = desc(HDR, 16, next, 1);
    for i in 0..count {
        it.extend(desc(0x40000 + u64::from(i) * 512, 512, next | wr, i + 2));
    }
    it.extend(desc(STATUS, 1, wr, 0));
    mem.write(table_at, &it);
    mem.write(HDR, &hdr);
    let t = desc(table_at, it.len() as u32, ind, 0);
    let st = raw_request(&mem, &kick, n, &t);
    assert!(
        matches!(st, Some(s) if s != 0),
        "1100 segments: status {st:?}"
    );
    n += 1;
    let (st, data) = good_read(n);
    assert_eq!(
        st,
        Some(0),
        "after the indirect table: the next good read failed"
    );
    assert!(data == image[4096..8192]);
    assert!(std::fs::read(&disk).unwrap() == image, "the disk changed");
    drop(fe);
    srv.stop();
}

/// The frontend replaces its memory table (the same memory as two regions, mapped anew by
/// the backend) while a read waits on the network: the read completes into guest memory
/// with the right data, and the device goes on serving.
#[test]
fn memory_table_replaced_while_a_read_waits_on_the_network() {
    use common::fault_proxy::{Fault, FaultProxy, Rule, When};
    let fx = Fixture::new(101, 3 << 20, &[]);
    let proxy = FaultProxy::start(fx._nginx.port());
    let stall = Fault::Stall {
        after: 100,
        secs: 2,
    };
    proxy.set_plan(1, vec![Rule::new(When::Always, stall).limit(1)]);
    let url = proxy.url("t.img");
    let srv = Served::start_strict(&fx.disk, &fx.sock(), &["--no-hydrate", "--target", &url]);
    let mem = GuestMem::new();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    let fe = connect_like_qemu(&fx.sock(), &mem, &kick, &call);
    let read_at = |n: u16, sector: u64, replace: Option<&Frontend>| {
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write(HDR, &h);
        mem.write(DATA, &[0xEE; 4096]);
        let mut t = desc(HDR, 16, 1, 1);
        t.extend(desc(DATA, 4096, 3, 2));
        t.extend(desc(STATUS, 1, 2, 0));
        mem.write(DESC, &t);
        mem.write(STATUS, &[0xff]);
        mem.write(AVAIL + 4 + 2 * u64::from(n % QSIZE), &0u16.to_le_bytes());
        mem.write(AVAIL + 2, &(n + 1).to_le_bytes());
        kick.write(1).unwrap();
        if let Some(fe) = replace {
            std::thread::sleep(Duration::from_millis(300));
            assert_ne!(mem.read_u16(USED + 2), n + 1, "the read did not wait");
            let half = SPLIT;
            let table: Vec<_> = [(0, half), (half, half)]
                .iter()
                .map(|&(gpa, size)| VhostUserMemoryRegionInfo {
                    guest_phys_addr: gpa,
                    memory_size: size,
                    userspace_addr: mem.uva(gpa),
                    mmap_offset: gpa,
                    mmap_handle: mem.fd,
                })
                .collect();
            fe.set_mem_table(&table).unwrap();
        }
        let t = std::time::Instant::now();
        while mem.read_u16(USED + 2) != n + 1 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "read {n} never completed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        (mem.read(STATUS, 1)[0], mem.read(DATA, 4096))
    };
    let off = 1 << 20;
    let (st, data) = read_at(0, off as u64 / 512, Some(&fe));
    assert_eq!(st, 0, "the read across the table change failed");
    assert!(
        data == fx.target[off..off + 4096],
        "wrong data after the table change"
    );
    let (st, data) = read_at(1, 8, None);
    assert_eq!(st, 0);
    assert!(data == fx.target[4096..8192], "the next read is wrong");
    drop(fe);
    srv.stop();
}
