//! NBD negotiation (and the transmission phase after it) against a hostile client: the
//! fuzz input is everything the client sends. The server's output must be its greeting
//! followed by whole, well-formed option replies (plus the export-name answer), an export
//! is only ever chosen from the catalog, and transmission never panics.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use streamboot::nbd::proto::{
    negotiate, transmit, Negotiated, IHAVEOPT, NBD_MAGIC, OPT_EXPORT_NAME, REPLY_MAGIC,
};
use streamboot::nbd::MemoryCatalog;
use streamboot_fuzz::nbd_images;

/// The client: reads come from the fuzz input (then end of stream), writes are collected.
struct Client<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut catalog = MemoryCatalog::default();
    for (name, image) in nbd_images() {
        catalog.insert(name, image);
    }
    let mut client = Client {
        input: data,
        output: Vec::new(),
    };
    let result = negotiate(&mut client, &catalog);

    // Greeting, then option replies: magic, option, type, length, data.
    let out = &client.output;
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(out[0..8], NBD_MAGIC.to_be_bytes());
    assert_eq!(out[8..16], IHAVEOPT.to_be_bytes());
    let mut at = 18;
    let mut last_opt = None;
    while out.len() - at >= 20 && out[at..at + 8] == REPLY_MAGIC.to_be_bytes() {
        let opt = u32::from_be_bytes(out[at + 8..at + 12].try_into().unwrap());
        let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
        assert!(out.len() - at - 20 >= len, "option reply cut short");
        at += 20 + len;
        last_opt = Some(opt);
    }
    let tail = out.len() - at;

    match result {
        Ok(Negotiated::Export {
            name,
            export,
            structured,
            ..
        }) => {
            let image = nbd_images()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, image)| image)
                .expect("the chosen export is in the catalog");
            assert_eq!(export.size(), image.len() as u64);
            // NBD_OPT_GO ends on its ACK reply; NBD_OPT_EXPORT_NAME on size + flags
            // (+ 124 zero bytes unless the client asked for none).
            assert!(
                tail == 0 || tail == 10 || tail == 134,
                "{tail} stray bytes after the replies"
            );
            if tail != 0 {
                assert_eq!(out[at..at + 8], export.size().to_be_bytes());
            } else {
                assert_ne!(last_opt, Some(OPT_EXPORT_NAME));
            }
            // Transmission on what the client sends next: replies only, never a panic,
            // and no more data sent than the replies hold.
            let mut requests = client.input;
            let mut replies = Vec::new();
            if let Ok(stats) = transmit(&mut requests, &mut replies, &*export, structured, 1) {
                assert!(stats.bytes_read <= replies.len() as u64);
            }
        }
        Ok(Negotiated::Aborted) | Err(_) => {
            assert_eq!(tail, 0, "{tail} stray bytes after the replies");
        }
    }
});
