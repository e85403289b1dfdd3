//! The NBD wire protocol (fixed newstyle), pure: handshake, option haggling and the
//! transmission phase over any `Read + Write`, with explicit limits on everything a
//! client sends. No sockets and no store here, so the negotiation can be driven (and
//! fuzzed) with in-memory byte streams.
//!
//! Replies are simple replies, or structured replies when the client negotiates
//! `NBD_OPT_STRUCTURED_REPLY`: then every reply is one chunk with the DONE flag
//! (`OFFSET_DATA` for a read, `NONE` for success, `ERROR` with a message). QEMU's client
//! needs them for an export whose size is not a multiple of 512 (with simple replies it
//! waits for the bytes of the rounded-up last sector).

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::{Catalog, Export, NbdError};

pub use super::transmit::{transmit, transmit_with, Request, TransmitOptions, TransmitStats};

/// `NBDMAGIC`: first word of the server's greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured chunk: nothing (success).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: an error with a message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Describe an export, stay in negotiation.
pub const OPT_INFO: u32 = 6;
/// Describe an export and start transmission on it.
pub const OPT_GO: u32 = 7;
/// Use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of a list.
pub const REP_SERVER: u32 = 2;
/// One information item of INFO/GO.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// The option is not known or not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// The server refuses for policy reasons.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// The option was malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// The option data is longer than the server accepts.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// The server accepts `NBD_CMD_FLUSH`.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Several connections to the export see the same data (always true read-only).
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The flags every export is offered with.
pub const EXPORT_FLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write (refused: the exports are read-only).
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush (nothing to flush: accepted).
pub const CMD_FLUSH: u16 = 3;
/// Trim (refused).
pub const CMD_TRIM: u16 = 4;
/// Write zeroes (refused).
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Errors of simple replies (Linux errno values, as the protocol fixes them).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;

/// Longest option payload accepted (a name of [`MAX_NAME_LEN`] plus info requests fits).
pub const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Longest export name accepted (the protocol's own limit).
pub const MAX_NAME_LEN: u32 = 4096;
/// Options accepted in one negotiation before the server gives up on the client.
pub const MAX_OPTIONS: u32 = 1024;
/// Longest read or write payload of one request (also advertised as the maximum block
/// size); a longer read gets `EINVAL`, a longer write closes the connection.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Length of a transmission request.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// How a negotiation ended.
pub enum Negotiated {
    /// Transmission starts on this export.
    Export {
        /// Name the client asked for.
        name: String,
        /// The export.
        export: Arc<dyn Export>,
        /// The client negotiated structured replies.
        structured: bool,
    },
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

impl std::fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Negotiated::Export {
                name,
                export,
                structured,
            } => f
                .debug_struct("Export")
                .field("name", name)
                .field("size", &export.size())
                .field("structured", structured)
                .finish(),
            Negotiated::Aborted => f.write_str("Aborted"),
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Sends one option reply.
fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)?;
    w.flush()
}

/// Sends an error reply with a human-readable message (clients print it).
fn option_error(w: &mut impl Write, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
    option_reply(w, opt, kind, msg.as_bytes())
}

/// The parsed payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
struct InfoRequest {
    name: String,
    infos: Vec<u16>,
}

/// Parses an INFO/GO payload; `Err` is the message of an `NBD_REP_ERR_INVALID`.
fn parse_info_request(data: &[u8]) -> Result<InfoRequest, String> {
    let malformed = || format!("malformed INFO/GO payload ({} bytes)", data.len());
    let name_len = data
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(malformed)?;
    if name_len > MAX_NAME_LEN {
        return Err(format!("export name of {name_len} bytes is too long"));
    }
    let name_end = 4 + name_len as usize;
    let name = data.get(4..name_end).ok_or_else(malformed)?;
    let name = std::str::from_utf8(name)
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_owned();
    let n = data
        .get(name_end..name_end + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(malformed)?;
    let rest = &data[name_end + 2..];
    if rest.len() != 2 * n as usize {
        return Err(malformed());
    }
    let infos = rest
        .chunks_exact(2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .collect();
    Ok(InfoRequest { name, infos })
}

/// Runs the server side of a fixed-newstyle handshake on `stream` until the client picks
/// an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or aborts.
///
/// Every malformed or hostile input either gets an option error reply (when the stream
/// stays in sync) or ends the negotiation with an [`NbdError`] (when it cannot: bad magic,
/// unknown client flags, option data over [`MAX_OPTION_LEN`], too many options, an
/// unknown name with `NBD_OPT_EXPORT_NAME`, end of stream). The caller then closes the
/// connection. Nothing is allocated beyond [`MAX_OPTION_LEN`] per option.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn Catalog,
) -> Result<Negotiated, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    stream.flush()?;

    let client_flags = read_u32(stream)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags(client_flags));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;

    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(stream)?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic {
                what: "option",
                found: magic,
            });
        }
        let opt = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION_LEN {
            // The payload cannot be skipped without reading it all: say why, then close.
            if fixed {
                let _ = option_error(
                    stream,
                    opt,
                    REP_ERR_TOO_BIG,
                    &format!("option data of {len} bytes exceeds {MAX_OPTION_LEN}"),
                );
            }
            return Err(NbdError::OptionTooLong { option: opt, len });
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        if !fixed && opt != OPT_EXPORT_NAME {
            // Plain newstyle has no way to refuse an option but closing.
            return Err(NbdError::Protocol(format!(
                "option {opt} from a client without fixed newstyle"
            )));
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| NbdError::Protocol("export name is not UTF-8".into()))?;
                let export = match catalog.open(&name) {
                    Ok(Some(e)) => e,
                    Ok(None) => return Err(NbdError::UnknownExport(name)),
                    Err(reason) => return Err(NbdError::ExportUnavailable { name, reason }),
                };
                let mut m = Vec::with_capacity(10 + 124);
                m.extend_from_slice(&export.size().to_be_bytes());
                m.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&m)?;
                stream.flush()?;
                return Ok(Negotiated::Export {
                    name,
                    export,
                    structured,
                });
            }
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = option_reply(stream, opt, REP_ACK, &[]);
                return Ok(Negotiated::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(stream, opt, REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                match catalog.names() {
                    Ok(names) => {
                        for n in names {
                            let mut d = Vec::with_capacity(4 + n.len());
                            d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                            d.extend_from_slice(n.as_bytes());
                            option_reply(stream, opt, REP_SERVER, &d)?;
                        }
                        option_reply(stream, opt, REP_ACK, &[])?;
                    }
                    Err(reason) => {
                        // Details (paths, URLs) stay in the log; the peer gets a generic
                        // message.
                        tracing::warn!(%reason, "cannot list the exports");
                        option_error(stream, opt, REP_ERR_POLICY, "cannot list the exports")?
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(msg) => {
                        option_error(stream, opt, REP_ERR_INVALID, &msg)?;
                        continue;
                    }
                };
                let export = match catalog.open(&req.name) {
                    Ok(Some(e)) => e,
                    Ok(None) => {
                        let msg = format!("no export named {:?}", req.name);
                        option_error(stream, opt, REP_ERR_UNKNOWN, &msg)?;
                        continue;
                    }
                    Err(reason) => {
                        tracing::warn!(export = %req.name, %reason, "export cannot be opened");
                        let msg = format!(
                            "export {:?} is not available (see the server log)",
                            req.name
                        );
                        option_error(stream, opt, REP_ERR_UNKNOWN, &msg)?;
                        continue;
                    }
                };
                let mut d = Vec::with_capacity(12);
                d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                d.extend_from_slice(&export.size().to_be_bytes());
                d.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                option_reply(stream, opt, REP_INFO, &d)?;
                if req.infos.contains(&INFO_BLOCK_SIZE) {
                    let mut d = Vec::with_capacity(14);
                    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&export.preferred_block_size().to_be_bytes());
                    d.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
                    option_reply(stream, opt, REP_INFO, &d)?;
                }
                option_reply(stream, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Negotiated::Export {
                        name: req.name,
                        export,
                        structured,
                    });
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    option_reply(stream, opt, REP_ACK, &[])?;
                } else {
                    option_error(
                        stream,
                        opt,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    )?;
                }
            }
            other => {
                option_error(
                    stream,
                    other,
                    REP_ERR_UNSUP,
                    &format!("option {other} is not supported"),
                )?;
            }
        }
    }
    Err(NbdError::TooManyOptions)
}
