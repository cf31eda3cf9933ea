//! Sans-I/O sessions (PROTOCOL.md 9): bytes in, typed events out, bytes to send.
//!
//! Client: `START --start()--> AWAIT_WELCOME --WELCOME--> OPEN`; REFUSED or any error
//! leads to `CLOSED`, which is final (sticky: the same error class for every later
//! call). In OPEN every frame is an AEAD message; a reply is accepted only if its
//! `req_id` is pending with the same opcode, and the MAC rules of 8.4 hold.
//!
//! Resumption (PROTOCOL.md 16): every pending request keeps its plaintext (MAC included)
//! until its reply. When the shell loses the connection (never after an integrity or
//! protocol error, which is CLOSED for good) it calls `detach()`: `OPEN --> DETACHED`,
//! pending requests kept, new ones queued unsent. It then handshakes a fresh session on a
//! new connection and hands it to `resume_over()`: `DETACHED --> RESUMING`, a RESUME
//! listing the awaited ids queued in `take_outgoing()`. Its OK reply (`last_req_id` L)
//! brings `RESUMING --> OPEN` and queues, in id order, every pending request above L;
//! the others are answered by the service (replayed, still queued, or ESTALE with
//! opcode RESUME, which only a resumed session accepts for any pending id). A refused
//! RESUME closes the session with `Error::Lost`. Key-binding MACs bind the id of the
//! handshake that created the session for its whole life (`session_id()`).
//! The service side is here too, small, for tests and the interop tool.

use crate::consts::{
    Direction, FrameKind, Opcode, Status, HANDSHAKE_HEADER_BYTES, MAC_BYTES, MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT, RESUME_MAX_AWAITED, VERSION,
};
use crate::crypto::{
    generate_keypair, keybind_mac, resume_verifier, verify_keybind_mac, Initiator, Responder,
    ResumeSecret, SessionId, Transport,
};
use crate::error::{Error, Result};
use crate::frame::{encode_frame, FrameDecoder};
use crate::msg::{
    decode_reply, decode_request, encode_reply, encode_request, may_carry_mac, Mac, Reply,
    ReplyBody, Request, RequestBody,
};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Start,
    AwaitHello,
    AwaitWelcome,
    Open,
    /// Client: the connection was lost; requests are kept (and queued) for a RESUME.
    Detached,
    /// Client: RESUME sent on a new connection, its reply awaited.
    Resuming,
    Closed,
}

/// A handshake frame's kind and payload; refuses short bodies, other versions and
/// unknown kinds.
pub fn split_handshake(body: &[u8]) -> Result<(FrameKind, &[u8])> {
    if body.len() < HANDSHAKE_HEADER_BYTES {
        return Err(Error::protocol("handshake frame truncated"));
    }
    if body[0] != VERSION {
        return Err(Error::protocol(format!(
            "unsupported protocol version {}",
            body[0]
        )));
    }
    let kind = FrameKind::from_wire(body[1])
        .ok_or_else(|| Error::protocol(format!("unknown handshake frame kind {}", body[1])))?;
    Ok((kind, &body[HANDSHAKE_HEADER_BYTES..]))
}

fn handshake_frame(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(HANDSHAKE_HEADER_BYTES + payload.len());
    body.push(VERSION);
    body.push(kind.wire());
    body.extend_from_slice(payload);
    encode_frame(&body)
}

/// A REFUSED frame's payload (`status` then text) as the client must judge it.
pub fn parse_refusal(payload: &[u8]) -> Error {
    if payload.len() < 2 {
        return Error::protocol("refusal truncated");
    }
    match Status::from_wire(u16::from_be_bytes([payload[0], payload[1]])) {
        None => Error::protocol("refusal with unknown status"),
        Some(Status::OK) => Error::protocol("refusal with status OK"),
        Some(status) => Error::Refused {
            status,
            text: String::from_utf8_lossy(&payload[2..]).into_owned(),
        },
    }
}

#[derive(Debug)]
struct Pending {
    opcode: Opcode,
    /// The request carried a MAC under this key; its OK reply must too.
    key: Option<Vec<u8>>,
    /// The plaintext message, MAC included, to re-send after a RESUME.
    plaintext: Vec<u8>,
}

/// The client's end of one session, over one connection at a time.
pub struct ClientSession {
    state: State,
    decoder: FrameDecoder,
    initiator: Option<Initiator>,
    transport: Option<Transport>,
    next_req_id: u64,
    /// Ordered by id: a RESUME lists them and re-sends them in this order.
    pending: BTreeMap<u64, Pending>,
    /// The error that closed the session, returned again by every later call.
    failure: Option<Error>,
    /// The id of the handshake that created the session: what MACs bind, what RESUME
    /// names, for the session's whole life.
    binding: Option<SessionId>,
    /// The session's current resumption secret R.
    secret: Option<ResumeSecret>,
    /// While RESUMING: the RESUME's id and the new connection's secret, which becomes
    /// the session's R once the service accepts (it rotates V to BLAKE2s of it).
    resuming: Option<(u64, ResumeSecret)>,
    /// Frames the shell must write (the RESUME, then re-sent requests).
    outgoing: Vec<u8>,
    /// Resumed at least once: an ESTALE with opcode RESUME may answer any pending id.
    resumed: bool,
    /// The highest request id ever handed to a connection: a RESUME's `last_req_id`
    /// above it would claim requests the service never received.
    sent_upto: u64,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    pub fn new(service_public: &[u8]) -> Result<Self> {
        Ok(Self::with_initiator(Initiator::new(service_public)?))
    }

    /// A session over a prepared initiator (the interop tests fix its ephemeral key).
    pub fn with_initiator(initiator: Initiator) -> Self {
        ClientSession {
            state: State::Start,
            decoder: FrameDecoder::new(),
            initiator: Some(initiator),
            transport: None,
            next_req_id: 1,
            pending: BTreeMap::new(),
            failure: None,
            binding: None,
            secret: None,
            resuming: None,
            outgoing: Vec::new(),
            resumed: false,
            sent_upto: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn established(&self) -> bool {
        self.state == State::Open
    }

    /// How many requests await their reply.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True until the reply to `req_id` has come out of `receive_data`.
    pub fn is_pending(&self, req_id: u64) -> bool {
        self.pending.contains_key(&req_id)
    }

    /// The session's id: the hash of the handshake that created it (unchanged by any
    /// number of resumptions; key-binding MACs bind it).
    pub fn session_id(&self) -> Option<&SessionId> {
        self.binding.as_ref()
    }

    /// The handshake hash of the current connection (the session id until a resume).
    pub fn connection_id(&self) -> Option<&SessionId> {
        self.transport.as_ref().map(Transport::session_id)
    }

    /// The session's current resumption secret R (the tests compare it across
    /// implementations; it is never written anywhere but into a RESUME).
    pub fn resume_secret(&self) -> Option<&ResumeSecret> {
        self.secret.as_ref()
    }

    /// Whether `detach()` would keep this session for a RESUME: established once, and
    /// not closed by an error.
    pub fn resumable(&self) -> bool {
        matches!(self.state, State::Open | State::Detached | State::Resuming)
            && self.binding.is_some()
            && self.secret.is_some()
    }

    /// The frames queued for the service by the session itself (RESUME and the
    /// requests it re-sends); the shell writes them after `resume_over` and after every
    /// `receive_data`.
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outgoing)
    }

    /// The connection is gone (EOF, reset, service restart): keep every pending request
    /// for a RESUME on a new connection; requests sent meanwhile are queued unsent.
    /// A RESUME in flight is forgotten (the service answers it on no connection).
    pub fn detach(&mut self) -> Result<()> {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        if !self.resumable() {
            return Err(Error::misuse("only an established session can be detached"));
        }
        if let Some((resume_id, _)) = self.resuming.take() {
            self.pending.remove(&resume_id);
        }
        self.state = State::Detached;
        self.transport = None;
        self.decoder = FrameDecoder::new();
        self.outgoing.clear();
        Ok(())
    }

    /// Carry this detached session on to `fresh`, a session just established on a new
    /// connection (to the same pinned service) that has sent nothing: queue its RESUME
    /// (in `take_outgoing()`). More pending requests than a RESUME may list closes the
    /// session with `Error::Lost`.
    pub fn resume_over(&mut self, fresh: ClientSession) -> Result<()> {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        if self.state != State::Detached {
            return Err(Error::misuse("only a detached session can resume"));
        }
        let (Some(binding), Some(secret)) = (self.binding, self.secret) else {
            return Err(Error::misuse("session was never established"));
        };
        let new_secret = match (&fresh.state, fresh.secret, fresh.next_req_id) {
            (State::Open, Some(s), 1) => s,
            _ => {
                return Err(Error::misuse(
                    "resume over a fresh, unused, established session",
                ))
            }
        };
        if self.pending.len() > RESUME_MAX_AWAITED {
            return Err(self.fail(Error::Lost(format!(
                "{} requests in flight, more than a RESUME may list ({RESUME_MAX_AWAITED})",
                self.pending.len()
            ))));
        }
        let resume_id = self.next_req_id;
        if resume_id == u64::MAX {
            return Err(Error::misuse("request ids exhausted"));
        }
        let body = RequestBody::Resume {
            session: binding,
            secret,
            awaited: self.pending.keys().copied().collect(),
        };
        let msg = encode_request(
            &Request {
                req_id: resume_id,
                body,
            },
            false,
        )?;
        let mut transport = fresh
            .transport
            .ok_or_else(|| Error::misuse("fresh session has no transport"))?;
        let frame = encode_frame(&transport.encrypt(&msg)?)?;
        self.transport = Some(transport);
        self.decoder = fresh.decoder;
        self.next_req_id += 1;
        self.pending.insert(
            resume_id,
            Pending {
                opcode: Opcode::RESUME,
                key: None,
                plaintext: Vec::new(),
            },
        );
        self.resuming = Some((resume_id, new_secret));
        self.outgoing.extend(frame);
        self.state = State::Resuming;
        Ok(())
    }

    /// The error that closed this session, if one did.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.as_ref()
    }

    /// The HELLO frame that opens the handshake.
    pub fn start(&mut self) -> Result<Vec<u8>> {
        if self.state != State::Start {
            return Err(Error::misuse("handshake already started"));
        }
        let ini = self
            .initiator
            .as_mut()
            .ok_or_else(|| Error::misuse("no initiator"))?;
        let hello = ini.hello()?;
        self.state = State::AwaitWelcome;
        handshake_frame(FrameKind::HELLO, &hello)
    }

    /// Encrypt a request into one frame under the next request id; with `key` it
    /// carries the key-binding MAC and its OK reply must carry one back. Returns the id
    /// and the frame. Nothing changes on error (checked before the nonce is used).
    /// While DETACHED or RESUMING the request is queued and the frame is empty: it goes
    /// out (through `take_outgoing`) once the session has resumed. RESUME is the
    /// session's own (`resume_over`).
    pub fn send_request(
        &mut self,
        body: &RequestBody,
        key: Option<&[u8]>,
    ) -> Result<(u64, Vec<u8>)> {
        if !matches!(self.state, State::Open | State::Detached | State::Resuming) {
            return Err(match &self.failure {
                Some(e) => e.clone(),
                None => Error::misuse("session not open"),
            });
        }
        if body.opcode() == Opcode::RESUME {
            return Err(Error::misuse("RESUME is sent by resume_over only"));
        }
        let binding = self.binding.ok_or_else(|| Error::misuse("no session id"))?;
        if key.is_some() && !may_carry_mac(body.opcode()) {
            return Err(Error::misuse(format!(
                "{} is never MAC'd (PROTOCOL.md 8.2)",
                body.opcode().name()
            )));
        }
        let req_id = self.next_req_id;
        if req_id == u64::MAX {
            return Err(Error::misuse("request ids exhausted"));
        }
        let req = Request {
            req_id,
            body: body.clone(),
        };
        let mut msg = encode_request(&req, key.is_some())?;
        if let Some(k) = key {
            let mac = keybind_mac(k, &binding, Direction::TO_SERVICE, &msg)?;
            msg.extend_from_slice(&mac);
        }
        if msg.len() > MAX_PLAINTEXT {
            return Err(Error::misuse("request too large"));
        }
        let frame = if self.state == State::Open {
            let transport = self
                .transport
                .as_mut()
                .ok_or_else(|| Error::misuse("no transport"))?;
            let frame = encode_frame(&transport.encrypt(&msg)?)?;
            self.sent_upto = req_id;
            frame
        } else {
            Vec::new()
        };
        self.next_req_id += 1;
        self.pending.insert(
            req_id,
            Pending {
                opcode: body.opcode(),
                key: key.map(<[u8]>::to_vec),
                plaintext: msg,
            },
        );
        Ok((req_id, frame))
    }

    /// Feed bytes from the service; returns the verified replies. A frame that fails
    /// authentication, parsing or matching closes the session and is returned as the
    /// error (and again by every later call); a REFUSED is `Error::Refused`.
    pub fn receive_data(&mut self, data: &[u8]) -> Result<Vec<Reply>> {
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        match self.receive_inner(data) {
            Ok(r) => Ok(r),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Close the session with `e` (I/O errors of the shell, keepalive expiry).
    pub fn fail(&mut self, e: Error) -> Error {
        self.state = State::Closed;
        self.initiator = None;
        self.pending.clear();
        self.secret = None;
        self.resuming = None;
        self.outgoing.clear();
        if self.failure.is_none() {
            self.failure = Some(e);
        }
        self.failure.clone().unwrap_or(e_closed())
    }

    fn receive_inner(&mut self, data: &[u8]) -> Result<Vec<Reply>> {
        if self.state == State::Closed {
            return Err(e_closed());
        }
        let mut replies = Vec::new();
        for body in self.decoder.feed(data)? {
            match self.state {
                State::AwaitWelcome => self.on_welcome(&body)?,
                State::Open | State::Resuming => replies.extend(self.on_reply(&body)?),
                s => return Err(Error::protocol(format!("no frame expected in state {s:?}"))),
            }
        }
        Ok(replies)
    }

    fn on_welcome(&mut self, body: &[u8]) -> Result<()> {
        let (kind, payload) = split_handshake(body)?;
        match kind {
            FrameKind::REFUSED => Err(parse_refusal(payload)),
            FrameKind::WELCOME => {
                let ini = self
                    .initiator
                    .take()
                    .ok_or_else(|| Error::protocol("expected WELCOME"))?;
                let (transport, secret) = ini.finish(payload)?;
                self.binding = Some(*transport.session_id());
                self.secret = Some(secret);
                self.transport = Some(transport);
                self.state = State::Open;
                Ok(())
            }
            FrameKind::HELLO => Err(Error::protocol("expected WELCOME")),
        }
    }

    /// One reply; `None` for the session's own RESUME.
    fn on_reply(&mut self, body: &[u8]) -> Result<Option<Reply>> {
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::protocol("no transport"))?;
        let binding = self
            .binding
            .ok_or_else(|| Error::protocol("no session id"))?;
        let plaintext = transport.decrypt(body)?;
        let d = decode_reply(&plaintext)?;
        let reply = d.message;
        if let Some((resume_id, _)) = self.resuming {
            // The RESUME's reply comes first; replays and re-sends only after it.
            if reply.req_id != resume_id || reply.opcode != Opcode::RESUME || d.mac.is_some() {
                return Err(Error::protocol(format!(
                    "reply {} before the RESUME's",
                    reply.req_id
                )));
            }
            self.on_resumed(&reply)?;
            return Ok(None);
        }
        let stale = self.resumed
            && reply.opcode == Opcode::RESUME
            && reply.status == Status::ESTALE
            && d.mac.is_none();
        let pending = match self.pending.remove(&reply.req_id) {
            Some(p) if p.opcode == reply.opcode => p,
            // The service lost this reply across a restart and no longer knows the
            // request's opcode (PROTOCOL.md 16.2): it says so under RESUME's.
            Some(_) if stale => return Ok(Some(reply)),
            _ => {
                return Err(Error::protocol(format!(
                    "reply {} answers no pending request",
                    reply.req_id
                )))
            }
        };
        match &pending.key {
            None if d.mac.is_some() => {
                return Err(Error::protocol("MAC on a reply to a request without one"))
            }
            None => {}
            // Never accept a success on a key-bound semaphore without the key's proof.
            Some(k) if d.mac.is_some() || reply.status == Status::OK => {
                verify_keybind_mac(k, &binding, Direction::TO_CLIENT, &d.signed, d.mac.as_ref())?
            }
            Some(_) => {}
        }
        Ok(Some(reply))
    }

    /// The RESUME's reply: OK carries on (queueing the re-sends), a refusal is `Lost`.
    fn on_resumed(&mut self, reply: &Reply) -> Result<()> {
        let Some((resume_id, new_secret)) = self.resuming else {
            return Err(Error::protocol("no RESUME in flight"));
        };
        let last = match (&reply.status, &reply.body) {
            (Status::OK, ReplyBody::LastReqId(last)) => *last,
            (Status::OK, _) => return Err(Error::protocol("RESUME reply without last_req_id")),
            (status, _) => {
                return Err(Error::Lost(format!(
                    "session could not be resumed: {} {}",
                    status.name(),
                    reply.message()
                )))
            }
        };
        if last > self.sent_upto {
            return Err(Error::protocol(format!(
                "service claims request {last}, which was never sent"
            )));
        }
        self.pending.remove(&resume_id);
        self.resuming = None;
        self.secret = Some(new_secret);
        self.state = State::Open;
        self.resumed = true;
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::protocol("no transport"))?;
        // In id order: those new to the service (above `last`), both the ones lost on
        // the old connection and the ones queued while detached.
        for (id, p) in self.pending.range(last.saturating_add(1)..) {
            let frame = encode_frame(&transport.encrypt(&p.plaintext)?)?;
            self.outgoing.extend(frame);
            self.sent_upto = *id;
        }
        Ok(())
    }
}

fn e_closed() -> Error {
    Error::protocol("session is closed")
}

/// A decrypted, well-formed request with what its MAC covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestIn {
    pub request: Request,
    pub signed: Vec<u8>,
    pub mac: Option<Mac>,
}

/// The service's end (tests, fuzzing, the interop tool; the real service is Python).
/// It follows the service's connection rules of PROTOCOL.md 16 (RESUME only first,
/// never MAC'd; after `adopt`, MACs bind the resumed session's id and re-sent ids are
/// accepted); the session table behind them is the test's.
pub struct ServerSession {
    state: State,
    decoder: FrameDecoder,
    responder: Option<Responder>,
    transport: Option<Transport>,
    last_req_id: u64,
    out: Vec<u8>,
    /// The resumption secret this connection's WELCOME carries.
    secret: ResumeSecret,
    /// The resumed session's id, once `adopt`ed.
    binding: Option<SessionId>,
    first_request: bool,
    /// The RESUME's id on an adopted connection: never valid again.
    resume_req_id: u64,
}

impl ServerSession {
    /// A responder whose WELCOME carries a random resumption secret (from the OS
    /// generator, through `snow`).
    pub fn new(static_private: &[u8]) -> Result<Self> {
        let (random, _) = generate_keypair()?;
        Self::with_secret(static_private, random)
    }

    /// A responder whose WELCOME carries `secret` (interop vectors fix it).
    pub fn with_secret(static_private: &[u8], secret: ResumeSecret) -> Result<Self> {
        Ok(ServerSession {
            state: State::AwaitHello,
            decoder: FrameDecoder::new(),
            responder: Some(Responder::new(static_private)?),
            transport: None,
            last_req_id: 0,
            out: Vec::new(),
            secret,
            binding: None,
            first_request: true,
            resume_req_id: 0,
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The handshake hash of this connection.
    pub fn session_id(&self) -> Option<&SessionId> {
        self.transport.as_ref().map(Transport::session_id)
    }

    /// The id MACs bind: the adopted session's, else this connection's.
    pub fn binding_id(&self) -> Option<&SessionId> {
        self.binding.as_ref().or(self.session_id())
    }

    /// `V = BLAKE2s(R)` of the secret this connection's WELCOME carries.
    pub fn verifier(&self) -> [u8; 32] {
        resume_verifier(&self.secret)
    }

    /// This connection now carries the resumed session `binding`: re-sent requests
    /// (ids above `last_req_id`, below the RESUME's) and new ones (above it) are
    /// accepted in increasing order; the RESUME's own id never again.
    pub fn adopt(
        &mut self,
        binding: SessionId,
        last_req_id: u64,
        resume_req_id: u64,
    ) -> Result<()> {
        if self.state != State::Open {
            return Err(Error::misuse("cannot resume in this state"));
        }
        self.binding = Some(binding);
        self.last_req_id = last_req_id;
        self.resume_req_id = resume_req_id;
        Ok(())
    }

    /// Queue a reply's plaintext as it is (a reply re-sent from a replay window).
    pub fn send_plaintext(&mut self, msg: &[u8]) -> Result<()> {
        if self.state != State::Open {
            return Err(Error::misuse("cannot reply in this state"));
        }
        let t = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::misuse("no transport"))?;
        let frame = encode_frame(&t.encrypt(msg)?)?;
        self.out.extend(frame);
        Ok(())
    }

    pub fn data_to_send(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn receive_data(&mut self, data: &[u8]) -> Result<Vec<RequestIn>> {
        let r = self.receive_inner(data);
        if r.is_err() {
            self.state = State::Closed;
            self.responder = None;
        }
        r
    }

    fn receive_inner(&mut self, data: &[u8]) -> Result<Vec<RequestIn>> {
        if self.state == State::Closed {
            return Err(e_closed());
        }
        let mut events = Vec::new();
        for body in self.decoder.feed(data)? {
            match self.state {
                State::AwaitHello => {
                    let (kind, payload) = split_handshake(&body)?;
                    let resp = match (kind, self.responder.take()) {
                        (FrameKind::HELLO, Some(r)) => r,
                        _ => return Err(Error::protocol("expected HELLO")),
                    };
                    let (welcome, transport) = resp.respond(payload, &self.secret)?;
                    self.out
                        .extend(handshake_frame(FrameKind::WELCOME, &welcome)?);
                    self.transport = Some(transport);
                    self.state = State::Open;
                }
                State::Open => {
                    let t = self
                        .transport
                        .as_mut()
                        .ok_or_else(|| Error::protocol("no transport"))?;
                    let d = decode_request(&t.decrypt(&body)?)?;
                    let id = d.message.req_id;
                    if id <= self.last_req_id || id == self.resume_req_id {
                        return Err(Error::protocol(format!(
                            "request id {id} does not increase"
                        )));
                    }
                    match d.message.body.opcode() {
                        Opcode::RESUME if !self.first_request => {
                            return Err(Error::protocol(
                                "RESUME is valid only as the first request",
                            ))
                        }
                        op @ (Opcode::RESUME | Opcode::END) if d.mac.is_some() => {
                            return Err(Error::protocol(format!("{} carries no MAC", op.name())))
                        }
                        _ => {}
                    }
                    self.first_request = false;
                    self.last_req_id = id;
                    events.push(RequestIn {
                        request: d.message,
                        signed: d.signed,
                        mac: d.mac,
                    });
                }
                s => return Err(Error::protocol(format!("no frame expected in state {s:?}"))),
            }
        }
        Ok(events)
    }

    /// Refuse the connection instead of the handshake.
    pub fn refuse(&mut self, status: Status, text: &str) -> Result<()> {
        let raw = &text.as_bytes()[..text.len().min(MAX_MESSAGE_BYTES)];
        let mut payload = status.wire().to_be_bytes().to_vec();
        payload.extend_from_slice(raw);
        self.out
            .extend(handshake_frame(FrameKind::REFUSED, &payload)?);
        self.state = State::Closed;
        Ok(())
    }

    /// Does `event`'s MAC verify under `key`?
    pub fn verify(&self, event: &RequestIn, key: &[u8]) -> Result<()> {
        let sid = self
            .binding_id()
            .ok_or_else(|| Error::misuse("session not established"))?;
        verify_keybind_mac(
            key,
            sid,
            Direction::TO_SERVICE,
            &event.signed,
            event.mac.as_ref(),
        )
    }

    pub fn send_reply(&mut self, reply: &Reply, mac_key: Option<&[u8]>) -> Result<()> {
        if self.state != State::Open {
            return Err(Error::misuse("cannot reply in this state"));
        }
        let binding = *self
            .binding_id()
            .ok_or_else(|| Error::misuse("no transport"))?;
        let mut msg = encode_reply(reply, mac_key.is_some())?;
        if let Some(k) = mac_key {
            let mac = keybind_mac(k, &binding, Direction::TO_CLIENT, &msg)?;
            msg.extend_from_slice(&mac);
        }
        debug_assert!(msg.len() <= MAX_PLAINTEXT && MAC_BYTES == 32);
        self.send_plaintext(&msg)
    }
}
