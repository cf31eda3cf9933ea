//! Request and reply messages (PROTOCOL.md 5, 6): what travels inside the AEAD layer.
//!
//! Decoders take untrusted bytes and either return exactly one well-formed message or a
//! `Protocol` error, checking in the order of PROTOCOL.md 5.2 (size, header, version,
//! flag bits, MAC room, opcode, payload fields in order, trailing bytes). Decoding is
//! canonical: whatever parses re-encodes to exactly the bytes received. Encoders refuse
//! (as `Misuse`) any message the decoder would refuse, so this crate never sends one.
//! LIST and STAT JSON stays opaque bytes here. Which requests may carry a MAC is the
//! caller's rule (PROTOCOL.md 8.2: never CANCEL LIST PING SWITCHLESS); `may_carry_mac`
//! states it once for every client built on this crate.

use crate::consts::{
    open_flag, Opcode, Status, WaitMode, FLAG_HAS_MAC, HANDLE_BYTES, KEY_MAX_BYTES, KEY_MIN_BYTES,
    KNOWN_MSG_FLAGS, MAC_BYTES, MAX_CURSOR_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PLAINTEXT,
    MAX_TIMEOUT_NS, REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES, RESUME_SECRET_BYTES,
    SESSION_ID_BYTES, VERSION,
};
use crate::error::{Error, Result};

/// A 128-bit handle capability token.
pub type Handle = [u8; HANDLE_BYTES];
/// A key-binding MAC.
pub type Mac = [u8; MAC_BYTES];

/// The opcode-specific part of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestBody {
    Open {
        oflag: u8,
        mode: u16,
        value: u32,
        /// Only with CREAT; 16..32 bytes.
        key: Option<Vec<u8>>,
        name: String,
    },
    Close {
        handle: Handle,
    },
    Unlink {
        name: String,
    },
    Wait {
        handle: Handle,
        mode: WaitMode,
        timeout_ns: u64,
    },
    Post {
        handle: Handle,
    },
    GetValue {
        handle: Handle,
    },
    Cancel {
        target: u64,
    },
    Attach {
        handle: Handle,
    },
    /// One page of the names that sort after the cursor `after` ("": the first page).
    List {
        after: String,
    },
    Stat {
        name: String,
    },
    Ping,
    Switchless,
    /// Release the named semaphore's dead holders' units (PROTOCOL.md 6.5).
    Reclaim {
        name: String,
    },
    /// Carry on the session `session` on this new connection, proving it with its
    /// current resumption secret; `awaited` are the requests whose replies the client
    /// still awaits (PROTOCOL.md 16). Any count up to u16 parses; the service answers
    /// more than `RESUME_MAX_AWAITED` with EINVAL.
    Resume {
        session: [u8; SESSION_ID_BYTES],
        secret: [u8; RESUME_SECRET_BYTES],
        awaited: Vec<u64>,
    },
    /// End this session on purpose: no grace period.
    End,
}

impl RequestBody {
    pub fn opcode(&self) -> Opcode {
        match self {
            RequestBody::Open { .. } => Opcode::OPEN,
            RequestBody::Close { .. } => Opcode::CLOSE,
            RequestBody::Unlink { .. } => Opcode::UNLINK,
            RequestBody::Wait { .. } => Opcode::WAIT,
            RequestBody::Post { .. } => Opcode::POST,
            RequestBody::GetValue { .. } => Opcode::GETVALUE,
            RequestBody::Cancel { .. } => Opcode::CANCEL,
            RequestBody::Attach { .. } => Opcode::ATTACH,
            RequestBody::List { .. } => Opcode::LIST,
            RequestBody::Stat { .. } => Opcode::STAT,
            RequestBody::Ping => Opcode::PING,
            RequestBody::Switchless => Opcode::SWITCHLESS,
            RequestBody::Reclaim { .. } => Opcode::RECLAIM,
            RequestBody::Resume { .. } => Opcode::RESUME,
            RequestBody::End => Opcode::END,
        }
    }
}

/// Whether a request of this opcode may carry a key-binding MAC (PROTOCOL.md 8.2): the
/// service never looks up a key for CANCEL, LIST, PING or SWITCHLESS, so a MAC'd one
/// could only fail. STAT and RECLAIM are MAC'd when the caller gives the key. RESUME and
/// END concern the session, not a semaphore: never MAC'd (a MAC'd one is a protocol error).
pub fn may_carry_mac(op: Opcode) -> bool {
    !matches!(
        op,
        Opcode::CANCEL
            | Opcode::LIST
            | Opcode::PING
            | Opcode::SWITCHLESS
            | Opcode::RESUME
            | Opcode::END
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub req_id: u64,
    pub body: RequestBody,
}

/// The payload of a reply: `Refusal` iff the status is not OK, else by opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyBody {
    /// CLOSE UNLINK WAIT POST PING.
    Empty,
    /// OPEN ATTACH. `sem_id` names the semaphore (unique for the service's lifetime:
    /// a name unlinked and created again is another semaphore, with another id).
    Handle {
        handle: Handle,
        created: bool,
        sem_id: u64,
    },
    /// GETVALUE CANCEL SWITCHLESS RECLAIM (units released).
    Value(u32),
    /// LIST STAT: UTF-8 JSON, opaque here.
    Json(Vec<u8>),
    /// RESUME: `last_req_id`, the highest request of the session the service executed.
    LastReqId(u64),
    /// Any status but OK: text for a human, kept as received (may be invalid UTF-8).
    Refusal(Vec<u8>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub opcode: Opcode,
    pub req_id: u64,
    pub status: Status,
    pub body: ReplyBody,
}

impl Reply {
    /// The refusal text, decoded with U+FFFD replacement (empty for OK).
    pub fn message(&self) -> String {
        match &self.body {
            ReplyBody::Refusal(raw) => String::from_utf8_lossy(raw).into_owned(),
            _ => String::new(),
        }
    }
}

/// What a decoder returns besides the message: the bytes the MAC covers (the whole
/// message before the MAC) and the MAC, if the message carries one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded<T> {
    pub message: T,
    pub signed: Vec<u8>,
    pub mac: Option<Mac>,
}

/// The shape of each opcode's OK reply. One table, used by encoder and decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyShape {
    Empty,
    Handle,
    Value,
    Json,
    U64,
}

fn reply_shape(op: Opcode) -> ReplyShape {
    match op {
        Opcode::OPEN | Opcode::ATTACH => ReplyShape::Handle,
        Opcode::GETVALUE | Opcode::CANCEL | Opcode::SWITCHLESS | Opcode::RECLAIM => {
            ReplyShape::Value
        }
        Opcode::LIST | Opcode::STAT => ReplyShape::Json,
        Opcode::RESUME => ReplyShape::U64,
        Opcode::CLOSE
        | Opcode::UNLINK
        | Opcode::WAIT
        | Opcode::POST
        | Opcode::PING
        | Opcode::END => ReplyShape::Empty,
    }
}

/// Cursor over a message; every short read is a Protocol error.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let chunk = &self.data[self.pos..end];
                self.pos = end;
                Ok(chunk)
            }
            None => Err(Error::protocol("message truncated")),
        }
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn array32(&mut self) -> Result<[u8; 32]> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32)?);
        Ok(a)
    }
    fn handle(&mut self) -> Result<Handle> {
        let mut h = [0u8; HANDLE_BYTES];
        h.copy_from_slice(self.take(HANDLE_BYTES)?);
        Ok(h)
    }
    fn short_bytes(&mut self, lo: usize, hi: usize, what: &str) -> Result<&'a [u8]> {
        let n = self.u8()? as usize;
        if n < lo || n > hi {
            return Err(Error::protocol(format!(
                "{what} length {n} outside {lo}..{hi}"
            )));
        }
        self.take(n)
    }
    fn name(&mut self) -> Result<String> {
        let raw = self.short_bytes(2, MAX_NAME_BYTES + 1, "name")?;
        String::from_utf8(raw.to_vec()).map_err(|_| Error::protocol("name is not UTF-8"))
    }
    fn cursor(&mut self) -> Result<String> {
        let raw = self.short_bytes(0, MAX_CURSOR_BYTES, "cursor")?;
        String::from_utf8(raw.to_vec()).map_err(|_| Error::protocol("cursor is not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        let r = &self.data[self.pos..];
        self.pos = self.data.len();
        r
    }
    fn end(&self) -> Result<()> {
        if self.pos != self.data.len() {
            return Err(Error::protocol(format!(
                "{} trailing bytes",
                self.data.len() - self.pos
            )));
        }
        Ok(())
    }
}

/// Size limit, header, version, flag bits, MAC room: what requests and replies share.
/// Returns (opcode byte, req_id, the signed part, the MAC).
fn open_message<'a>(
    data: &'a [u8],
    header: usize,
    what: &str,
) -> Result<(u8, u64, &'a [u8], Option<Mac>)> {
    if data.len() > MAX_PLAINTEXT {
        return Err(Error::protocol(format!("{what} too large")));
    }
    if data.len() < header {
        return Err(Error::protocol("message truncated"));
    }
    if data[0] != VERSION {
        return Err(Error::protocol(format!(
            "unsupported protocol version {}",
            data[0]
        )));
    }
    let flags = data[2];
    if flags & !KNOWN_MSG_FLAGS != 0 {
        return Err(Error::protocol(format!("unknown flags {flags:#x}")));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&data[3..11]);
    let req_id = u64::from_be_bytes(id);
    if flags & FLAG_HAS_MAC == 0 {
        return Ok((data[1], req_id, data, None));
    }
    if data.len() < header + MAC_BYTES {
        return Err(Error::protocol("message truncated"));
    }
    let split = data.len() - MAC_BYTES;
    let mut mac = [0u8; MAC_BYTES];
    mac.copy_from_slice(&data[split..]);
    Ok((data[1], req_id, &data[..split], Some(mac)))
}

fn check_name(name: &str) -> Result<&[u8]> {
    let raw = name.as_bytes();
    if raw.len() < 2 || raw.len() > MAX_NAME_BYTES + 1 {
        return Err(Error::misuse(format!(
            "name of {} bytes outside 2..{} for the wire",
            raw.len(),
            MAX_NAME_BYTES + 1
        )));
    }
    Ok(raw)
}

fn check_cursor(after: &str) -> Result<&[u8]> {
    let raw = after.as_bytes();
    if raw.len() > MAX_CURSOR_BYTES {
        return Err(Error::misuse(format!(
            "cursor of {} bytes above {MAX_CURSOR_BYTES} for the wire",
            raw.len()
        )));
    }
    Ok(raw)
}

fn push_short(out: &mut Vec<u8>, raw: &[u8]) {
    out.push(raw.len() as u8); // callers bound the length to <= 252
    out.extend_from_slice(raw);
}

/// The request message without its MAC; with `mac` the HAS_MAC flag is set and the
/// caller appends the MAC over exactly these bytes. Refuses what no decoder accepts.
pub fn encode_request(req: &Request, mac: bool) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.push(VERSION);
    out.push(req.body.opcode().wire());
    out.push(if mac { FLAG_HAS_MAC } else { 0 });
    out.extend_from_slice(&req.req_id.to_be_bytes());
    match &req.body {
        RequestBody::Open {
            oflag,
            mode,
            value,
            key,
            name,
        } => {
            if oflag & !open_flag::KNOWN != 0 {
                return Err(Error::misuse(format!("unknown open flags {oflag:#x}")));
            }
            out.push(*oflag);
            out.extend_from_slice(&mode.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
            let key: &[u8] = key.as_deref().unwrap_or(&[]);
            if !key.is_empty() && !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&key.len()) {
                return Err(Error::misuse(format!(
                    "key of {} bytes; a key-binding key has {KEY_MIN_BYTES} to {KEY_MAX_BYTES}",
                    key.len()
                )));
            }
            push_short(&mut out, key);
            push_short(&mut out, check_name(name)?);
        }
        RequestBody::Wait {
            handle,
            mode,
            timeout_ns,
        } => {
            if *timeout_ns > MAX_TIMEOUT_NS || (*timeout_ns != 0 && *mode != WaitMode::TIMED) {
                return Err(Error::misuse("timeout out of range"));
            }
            out.extend_from_slice(handle);
            out.push(mode.wire());
            out.extend_from_slice(&timeout_ns.to_be_bytes());
        }
        RequestBody::Close { handle }
        | RequestBody::Post { handle }
        | RequestBody::GetValue { handle }
        | RequestBody::Attach { handle } => out.extend_from_slice(handle),
        RequestBody::Unlink { name }
        | RequestBody::Stat { name }
        | RequestBody::Reclaim { name } => push_short(&mut out, check_name(name)?),
        RequestBody::Cancel { target } => out.extend_from_slice(&target.to_be_bytes()),
        RequestBody::List { after } => push_short(&mut out, check_cursor(after)?),
        RequestBody::Resume {
            session,
            secret,
            awaited,
        } => {
            let count = u16::try_from(awaited.len())
                .map_err(|_| Error::misuse("RESUME lists at most 65535 request ids"))?;
            out.extend_from_slice(session);
            out.extend_from_slice(secret);
            out.extend_from_slice(&count.to_be_bytes());
            for id in awaited {
                out.extend_from_slice(&id.to_be_bytes());
            }
        }
        RequestBody::Ping | RequestBody::Switchless | RequestBody::End => {}
    }
    if out.len() + if mac { MAC_BYTES } else { 0 } > MAX_PLAINTEXT {
        return Err(Error::misuse("request too large"));
    }
    Ok(out)
}

/// Parse one request message (the service's side; also fuzzed and used by tests).
pub fn decode_request(data: &[u8]) -> Result<Decoded<Request>> {
    let (opcode, req_id, signed, mac) = open_message(data, REQUEST_HEADER_BYTES, "request")?;
    let op = Opcode::from_wire(opcode)
        .ok_or_else(|| Error::protocol(format!("unknown opcode {opcode}")))?;
    let mut r = Reader {
        data: signed,
        pos: REQUEST_HEADER_BYTES,
    };
    let body = match op {
        Opcode::OPEN => {
            let oflag = r.u8()?;
            let mode = r.u16()?;
            let value = r.u32()?;
            if oflag & !open_flag::KNOWN != 0 {
                return Err(Error::protocol(format!("unknown open flags {oflag:#x}")));
            }
            let key = r.short_bytes(0, KEY_MAX_BYTES, "key")?;
            if !key.is_empty() && key.len() < KEY_MIN_BYTES {
                return Err(Error::protocol(format!(
                    "key length {} below {KEY_MIN_BYTES}",
                    key.len()
                )));
            }
            let key = (!key.is_empty()).then(|| key.to_vec());
            let name = r.name()?;
            RequestBody::Open {
                oflag,
                mode,
                value,
                key,
                name,
            }
        }
        Opcode::CLOSE => RequestBody::Close {
            handle: r.handle()?,
        },
        Opcode::POST => RequestBody::Post {
            handle: r.handle()?,
        },
        Opcode::GETVALUE => RequestBody::GetValue {
            handle: r.handle()?,
        },
        Opcode::ATTACH => RequestBody::Attach {
            handle: r.handle()?,
        },
        Opcode::WAIT => {
            let handle = r.handle()?;
            let wm = r.u8()?;
            let timeout_ns = r.u64()?;
            let mode = WaitMode::from_wire(wm)
                .ok_or_else(|| Error::protocol(format!("unknown wait mode {wm}")))?;
            if timeout_ns > MAX_TIMEOUT_NS || (timeout_ns != 0 && mode != WaitMode::TIMED) {
                return Err(Error::protocol("timeout out of range"));
            }
            RequestBody::Wait {
                handle,
                mode,
                timeout_ns,
            }
        }
        Opcode::UNLINK => RequestBody::Unlink { name: r.name()? },
        Opcode::STAT => RequestBody::Stat { name: r.name()? },
        Opcode::RECLAIM => RequestBody::Reclaim { name: r.name()? },
        Opcode::CANCEL => RequestBody::Cancel { target: r.u64()? },
        Opcode::LIST => RequestBody::List { after: r.cursor()? },
        Opcode::PING => RequestBody::Ping,
        Opcode::SWITCHLESS => RequestBody::Switchless,
        Opcode::END => RequestBody::End,
        Opcode::RESUME => {
            let session = r.array32()?;
            let secret = r.array32()?;
            let count = r.u16()?;
            // Read the ids one by one: a count larger than the message is a short read.
            let awaited = (0..count).map(|_| r.u64()).collect::<Result<Vec<u64>>>()?;
            RequestBody::Resume {
                session,
                secret,
                awaited,
            }
        }
    };
    r.end()?;
    Ok(Decoded {
        message: Request { req_id, body },
        signed: signed.to_vec(),
        mac,
    })
}

/// The reply message without its MAC (the service's side: tests and the Rust responder).
/// A refusal's text is cut at `MAX_MESSAGE_BYTES`, as the service does.
pub fn encode_reply(rep: &Reply, mac: bool) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(32);
    out.push(VERSION);
    out.push(rep.opcode.wire());
    out.push(if mac { FLAG_HAS_MAC } else { 0 });
    out.extend_from_slice(&rep.req_id.to_be_bytes());
    out.extend_from_slice(&rep.status.wire().to_be_bytes());
    let shape = reply_shape(rep.opcode);
    match (&rep.body, rep.status == Status::OK) {
        (ReplyBody::Refusal(text), false) => {
            out.extend_from_slice(&text[..text.len().min(MAX_MESSAGE_BYTES)])
        }
        (ReplyBody::Empty, true) if shape == ReplyShape::Empty => {}
        (
            ReplyBody::Handle {
                handle,
                created,
                sem_id,
            },
            true,
        ) if shape == ReplyShape::Handle => {
            out.extend_from_slice(handle);
            out.push(u8::from(*created));
            out.extend_from_slice(&sem_id.to_be_bytes());
        }
        (ReplyBody::Value(v), true) if shape == ReplyShape::Value => {
            out.extend_from_slice(&v.to_be_bytes())
        }
        (ReplyBody::Json(data), true) if shape == ReplyShape::Json => out.extend_from_slice(data),
        (ReplyBody::LastReqId(v), true) if shape == ReplyShape::U64 => {
            out.extend_from_slice(&v.to_be_bytes())
        }
        _ => {
            return Err(Error::misuse(
                "reply body does not match its opcode and status",
            ))
        }
    }
    if out.len() + if mac { MAC_BYTES } else { 0 } > MAX_PLAINTEXT {
        return Err(Error::misuse("reply too large"));
    }
    Ok(out)
}

/// Parse one reply message from the service (untrusted bytes).
pub fn decode_reply(data: &[u8]) -> Result<Decoded<Reply>> {
    let (opcode, req_id, signed, mac) = open_message(data, REPLY_HEADER_BYTES, "reply")?;
    let status_raw = u16::from_be_bytes([signed[11], signed[12]]);
    let (op, status) = match (Opcode::from_wire(opcode), Status::from_wire(status_raw)) {
        (Some(op), Some(st)) => (op, st),
        _ => {
            return Err(Error::protocol(format!(
                "unknown opcode {opcode} or status {status_raw}"
            )))
        }
    };
    let mut r = Reader {
        data: signed,
        pos: REPLY_HEADER_BYTES,
    };
    let body = if status != Status::OK {
        let raw = r.rest();
        if raw.len() > MAX_MESSAGE_BYTES {
            return Err(Error::protocol("refusal text too long"));
        }
        ReplyBody::Refusal(raw.to_vec())
    } else {
        match reply_shape(op) {
            ReplyShape::Empty => ReplyBody::Empty,
            ReplyShape::Handle => {
                let handle = r.handle()?;
                let created = r.u8()?;
                if created > 1 {
                    return Err(Error::protocol("created flag out of range"));
                }
                ReplyBody::Handle {
                    handle,
                    created: created == 1,
                    sem_id: r.u64()?,
                }
            }
            ReplyShape::Value => ReplyBody::Value(r.u32()?),
            ReplyShape::Json => ReplyBody::Json(r.rest().to_vec()),
            ReplyShape::U64 => ReplyBody::LastReqId(r.u64()?),
        }
    };
    r.end()?;
    Ok(Decoded {
        message: Reply {
            opcode: op,
            req_id,
            status,
            body,
        },
        signed: signed.to_vec(),
        mac,
    })
}
