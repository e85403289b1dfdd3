//! The virtio-blk request layer against a hostile guest: a fuzzed descriptor table (any
//! flags, links, lengths, addresses, indirect tables) and fuzzed guest memory go through
//! `parse` and `execute` on an in-memory disk that panics on any access outside it. Every
//! chain completes with a status byte of OK, IOERR or UNSUPP; a refused chain leaves the
//! disk untouched; a completed write stored exactly the guest's bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamboot::virtio::{execute, parse, ExecOptions, Limits, RequestKind, Status};
use streamboot_fuzz::guest::*;
use streamboot_fuzz::{FuzzDisk, DISK_CAPACITY};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    if data.len() < PAYLOAD_INPUT_AT {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION0_LEN),
        (GuestAddress(REGION1_START), REGION1_LEN),
    ])
    .expect("guest memory");
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    mem.write_slice(&data[..DESC_TABLE_LEN], GuestAddress(0))
        .expect("descriptor table");
    let head = u16::from(data[HEAD_AT]) % QUEUE_SIZE;
    vq.avail().ring().ref_at(0).expect("ring slot").store(head);
    vq.avail().idx().store(1);
    let payload = &data[PAYLOAD_INPUT_AT..];
    let room0 = REGION0_LEN - PAYLOAD_AT as usize;
    let (p0, p1) = payload.split_at(payload.len().min(room0));
    mem.write_slice(p0, GuestAddress(PAYLOAD_AT))
        .expect("payload");
    let p1 = &p1[..p1.len().min(REGION1_LEN)];
    mem.write_slice(p1, GuestAddress(REGION1_START))
        .expect("payload");

    let opts = data[OPTS_AT];
    let disk = FuzzDisk::new(opts & 1 != 0, if opts & 4 != 0 { 4096 } else { 512 });
    let limits = Limits::for_backend(&disk);
    let exec = ExecOptions {
        writeback: opts & 2 == 0,
    };
    let mut queue: Queue = vq.create_queue().expect("queue");
    let Some(chain) = queue.iter(&mem).expect("avail ring").next() else {
        return;
    };
    assert_eq!(chain.head_index(), head);

    let (completion, status_addr, written) = match parse(chain, &limits) {
        Ok(req) => {
            // What a write must store, read before anything runs.
            let written = match req.kind() {
                RequestKind::Write {
                    offset, segments, ..
                } => {
                    let mut bytes = Vec::new();
                    for s in segments {
                        let mut b = vec![0u8; s.len as usize];
                        mem.read_slice(&mut b, s.addr).expect("checked segment");
                        bytes.extend_from_slice(&b);
                    }
                    Some((*offset, bytes))
                }
                _ => None,
            };
            let c = execute(&req, &mem, &disk, exec);
            (c, Some(req.status_addr()), written)
        }
        Err(rejected) => {
            assert_ne!(rejected.error.status(), Status::Ok);
            let c = rejected.complete(&mem);
            assert_eq!(
                disk.bytes(0, DISK_CAPACITY as usize),
                FuzzDisk::new(false, 512).bytes(0, DISK_CAPACITY as usize)
            );
            (c, rejected.status_addr, None)
        }
    };
    assert_eq!(completion.head_index, head);
    if let Some(addr) = status_addr {
        let byte: u8 = mem.read_obj(addr).expect("status byte is in guest memory");
        assert!(byte <= 2, "status byte {byte}");
        assert_eq!(byte, completion.status as u8);
        assert!(completion.used_len >= 1);
    } else {
        assert_eq!(completion.used_len, 0);
    }
    if let (Status::Ok, Some((offset, bytes))) = (completion.status, written) {
        assert_eq!(disk.bytes(offset, bytes.len()), bytes);
    }
});
