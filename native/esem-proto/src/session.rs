//! Sans-I/O sessions (PROTOCOL.md 9): bytes in, typed events out, bytes to send.
//!
//! Client: `START --start()--> AWAIT_WELCOME --WELCOME--> OPEN`; REFUSED or any error
//! leads to `CLOSED`, which is final (sticky: the same error class for every later
//! call). In OPEN every frame is an AEAD message; a reply is accepted only if its
//! `req_id` is pending with the same opcode, and the MAC rules of 8.4 hold.
//! The service side is here too, small, for tests and the interop tool.

use crate::consts::{
    Direction, FrameKind, Opcode, Status, HANDSHAKE_HEADER_BYTES, MAC_BYTES, MAX_MESSAGE_BYTES,
    MAX_PLAINTEXT, VERSION,
};
use crate::crypto::{keybind_mac, verify_keybind_mac, Initiator, Responder, SessionId, Transport};
use crate::error::{Error, Result};
use crate::frame::{encode_frame, FrameDecoder};
use crate::msg::{
    decode_reply, decode_request, encode_reply, encode_request, may_carry_mac, Mac, Reply, Request,
    RequestBody,
};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Start,
    AwaitHello,
    AwaitWelcome,
    Open,
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
}

/// The client's end of one connection.
pub struct ClientSession {
    state: State,
    decoder: FrameDecoder,
    initiator: Option<Initiator>,
    transport: Option<Transport>,
    next_req_id: u64,
    pending: HashMap<u64, Pending>,
    /// The error that closed the session, returned again by every later call.
    failure: Option<Error>,
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
            pending: HashMap::new(),
            failure: None,
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

    pub fn session_id(&self) -> Option<&SessionId> {
        self.transport.as_ref().map(Transport::session_id)
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
    pub fn send_request(
        &mut self,
        body: &RequestBody,
        key: Option<&[u8]>,
    ) -> Result<(u64, Vec<u8>)> {
        if self.state != State::Open {
            return Err(match &self.failure {
                Some(e) => e.clone(),
                None => Error::misuse("session not open"),
            });
        }
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::misuse("no transport"))?;
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
            let mac = keybind_mac(k, transport.session_id(), Direction::TO_SERVICE, &msg)?;
            msg.extend_from_slice(&mac);
        }
        if msg.len() > MAX_PLAINTEXT {
            return Err(Error::misuse("request too large"));
        }
        let frame = encode_frame(&transport.encrypt(&msg)?)?;
        self.next_req_id += 1;
        self.pending.insert(
            req_id,
            Pending {
                opcode: body.opcode(),
                key: key.map(<[u8]>::to_vec),
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
                State::Open => replies.push(self.on_reply(&body)?),
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
                self.transport = Some(ini.finish(payload)?);
                self.state = State::Open;
                Ok(())
            }
            FrameKind::HELLO => Err(Error::protocol("expected WELCOME")),
        }
    }

    fn on_reply(&mut self, body: &[u8]) -> Result<Reply> {
        let transport = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::protocol("no transport"))?;
        let plaintext = transport.decrypt(body)?;
        let d = decode_reply(&plaintext)?;
        let reply = d.message;
        let pending = match self.pending.remove(&reply.req_id) {
            Some(p) if p.opcode == reply.opcode => p,
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
            Some(k) if d.mac.is_some() || reply.status == Status::OK => verify_keybind_mac(
                k,
                transport.session_id(),
                Direction::TO_CLIENT,
                &d.signed,
                d.mac.as_ref(),
            )?,
            Some(_) => {}
        }
        Ok(reply)
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
pub struct ServerSession {
    state: State,
    decoder: FrameDecoder,
    responder: Option<Responder>,
    transport: Option<Transport>,
    last_req_id: u64,
    out: Vec<u8>,
}

impl ServerSession {
    pub fn new(static_private: &[u8]) -> Result<Self> {
        Ok(ServerSession {
            state: State::AwaitHello,
            decoder: FrameDecoder::new(),
            responder: Some(Responder::new(static_private)?),
            transport: None,
            last_req_id: 0,
            out: Vec::new(),
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn session_id(&self) -> Option<&SessionId> {
        self.transport.as_ref().map(Transport::session_id)
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
                    let (welcome, transport) = resp.respond(payload)?;
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
                    if d.message.req_id <= self.last_req_id {
                        return Err(Error::protocol(format!(
                            "request id {} does not increase",
                            d.message.req_id
                        )));
                    }
                    self.last_req_id = d.message.req_id;
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
            .session_id()
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
        let t = self
            .transport
            .as_mut()
            .ok_or_else(|| Error::misuse("no transport"))?;
        let mut msg = encode_reply(reply, mac_key.is_some())?;
        if let Some(k) = mac_key {
            let mac = keybind_mac(k, t.session_id(), Direction::TO_CLIENT, &msg)?;
            msg.extend_from_slice(&mac);
        }
        debug_assert!(msg.len() <= MAX_PLAINTEXT && MAC_BYTES == 32);
        let frame = encode_frame(&t.encrypt(&msg)?)?;
        self.out.extend(frame);
        Ok(())
    }
}
