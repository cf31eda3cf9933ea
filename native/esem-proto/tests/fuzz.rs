//! Fuzzing on stable: every parser that reads service (or peer) bytes gets at least
//! `ESEM_FUZZ_CASES` (default 100,000) random and mutated inputs, and must either parse
//! or return a protocol/integrity error, never panic and never blame the caller
//! (`Misuse`). Mutations start from valid messages so that deep paths are reached.
//! Deterministic (seeded xorshift) so a failure reproduces; the seed and input are
//! printed on a panic.

use esem_proto::consts::*;
use esem_proto::crypto::generate_keypair;
use esem_proto::frame::{encode_frame, FrameDecoder};
use esem_proto::msg::*;
use esem_proto::ring::{check_capacity, check_header, ConsumerIndex, ProducerIndex};
use esem_proto::session::{parse_refusal, split_handshake, ClientSession, ServerSession};
use esem_proto::{Error, State};
use std::panic::{catch_unwind, AssertUnwindSafe};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: plenty for picking mutations.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// A random input, or a mutation (flip, set, insert, delete, truncate, extend,
    /// splice of an interesting value) of one of `seeds`.
    fn input(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        if seeds.is_empty() || self.below(8) == 0 {
            let n = self.below(64);
            return self.bytes(n);
        }
        let mut v = seeds[self.below(seeds.len())].clone();
        for _ in 0..=self.below(3) {
            let len = v.len();
            match self.below(7) {
                0 if len > 0 => {
                    let i = self.below(len);
                    v[i] ^= 1 << self.below(8);
                }
                1 if len > 0 => {
                    let i = self.below(len);
                    v[i] = self.next() as u8;
                }
                2 => {
                    let i = self.below(len + 1);
                    v.insert(i, self.next() as u8);
                }
                3 if len > 0 => {
                    let i = self.below(len);
                    v.remove(i);
                }
                4 => {
                    let i = self.below(len + 1);
                    v.truncate(i);
                }
                5 => {
                    let n = self.below(40);
                    let b = self.bytes(n);
                    v.extend(b);
                }
                _ if len > 0 => {
                    let i = self.below(len);
                    let special = [0u8, 1, 2, 0x7f, 0x80, 0xff, 16, 32, 252, 253];
                    v[i] = special[self.below(special.len())];
                }
                _ => {}
            }
        }
        v
    }
}

fn cases() -> usize {
    std::env::var("ESEM_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

/// Run `f` on `cases()` inputs; panics (with the input) if `f` panics or returns Misuse.
fn fuzz<F: FnMut(&[u8]) -> Result<(), Error>>(what: &str, seed: u64, seeds: &[Vec<u8>], mut f: F) {
    let mut rng = Rng(seed);
    let n = cases();
    let mut parsed = 0usize;
    for i in 0..n {
        let input = rng.input(seeds);
        match catch_unwind(AssertUnwindSafe(|| f(&input))) {
            Ok(Ok(())) => parsed += 1,
            Ok(Err(Error::Misuse(m))) => {
                panic!("{what}: case {i} blamed the caller ({m}) for input {input:02x?}")
            }
            Ok(Err(_)) => {}
            Err(_) => panic!("{what}: case {i} (seed {seed}) panicked on input {input:02x?}"),
        }
    }
    eprintln!("{what}: {n} inputs, {parsed} parsed");
}

fn valid_requests() -> Vec<Vec<u8>> {
    let h = [9u8; 16];
    let bodies = vec![
        RequestBody::Open {
            oflag: 3,
            mode: 0o600,
            value: 1,
            key: Some(vec![1; 20]),
            name: "/sem".into(),
        },
        RequestBody::Open {
            oflag: 0,
            mode: 0,
            value: 0,
            key: None,
            name: "/é".into(),
        },
        RequestBody::Open {
            oflag: open_flag::CREAT | open_flag::ROBUST | open_flag::FOREIGN,
            mode: 0o644,
            value: 2,
            key: None,
            name: "/f".into(),
        },
        RequestBody::Close { handle: h },
        RequestBody::Unlink { name: "/u".into() },
        RequestBody::Wait {
            handle: h,
            mode: WaitMode::TIMED,
            timeout_ns: 5,
        },
        RequestBody::Wait {
            handle: h,
            mode: WaitMode::BLOCK,
            timeout_ns: 0,
        },
        RequestBody::Post { handle: h },
        RequestBody::GetValue { handle: h },
        RequestBody::Cancel { target: 3 },
        RequestBody::Attach { handle: h },
        RequestBody::List {
            after: String::new(),
        },
        RequestBody::List {
            after: "/é".into()
        },
        RequestBody::Stat { name: "/s".into() },
        RequestBody::Ping,
        RequestBody::Switchless,
        RequestBody::Reclaim { name: "/r".into() },
        RequestBody::Resume {
            session: [3; 32],
            secret: [4; 32],
            awaited: vec![1, 2, u64::MAX],
        },
        RequestBody::Resume {
            session: [0; 32],
            secret: [0; 32],
            awaited: vec![],
        },
        RequestBody::End,
    ];
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let req = Request {
            req_id: i as u64 + 1,
            body,
        };
        out.push(encode_request(&req, false).unwrap());
        let mut m = encode_request(&req, true).unwrap();
        m.extend_from_slice(&[0xaa; 32]);
        out.push(m);
    }
    out
}

fn valid_replies() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, op) in Opcode::ALL.iter().enumerate() {
        let body = match op {
            Opcode::OPEN | Opcode::ATTACH => ReplyBody::Handle {
                handle: [1; 16],
                created: true,
                sem_id: 0x0102_0304_0506_0708,
            },
            Opcode::GETVALUE | Opcode::CANCEL | Opcode::SWITCHLESS | Opcode::RECLAIM => {
                ReplyBody::Value(7)
            }
            Opcode::LIST | Opcode::STAT => ReplyBody::Json(b"{\"a\": 1}".to_vec()),
            Opcode::RESUME => ReplyBody::LastReqId(41),
            _ => ReplyBody::Empty,
        };
        let ok = Reply {
            opcode: *op,
            req_id: i as u64,
            status: Status::OK,
            body,
        };
        let no = Reply {
            opcode: *op,
            req_id: i as u64,
            status: Status::ALL[1 + i % (Status::ALL.len() - 1)],
            body: ReplyBody::Refusal(b"nope".to_vec()),
        };
        for r in [ok, no] {
            out.push(encode_reply(&r, false).unwrap());
            let mut m = encode_reply(&r, true).unwrap();
            m.extend_from_slice(&[0x55; 32]);
            out.push(m);
        }
    }
    out
}

fn framed(seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    seeds.iter().map(|s| encode_frame(s).unwrap()).collect()
}

#[test]
fn fuzz_message_decoders() {
    let reqs = valid_requests();
    fuzz("decode_request", 1, &reqs, |b| {
        decode_request(b).map(|_| ())
    });
    let reps = valid_replies();
    fuzz("decode_reply", 2, &reps, |b| decode_reply(b).map(|_| ()));
}

#[test]
fn fuzz_frame_decoder_whole_and_byte_by_byte() {
    let mut seeds = framed(&valid_replies());
    // Several frames in one stream, and lengths at the limits.
    seeds.push(seeds[..4].concat());
    seeds.push([(MAX_FRAME_BODY as u32).to_be_bytes().to_vec(), vec![0; 20]].concat());
    seeds.push(((MAX_FRAME_BODY + 1) as u32).to_be_bytes().to_vec());
    fuzz("FrameDecoder whole", 3, &seeds, |b| {
        let mut d = FrameDecoder::new();
        let frames = d.feed(b)?;
        let total: usize = frames.iter().map(|f| f.len() + 4).sum();
        assert_eq!(total + d.buffered(), b.len());
        Ok(())
    });
    fuzz("FrameDecoder byte by byte", 4, &seeds, |b| {
        let whole = FrameDecoder::new().feed(b);
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut err = None;
        for byte in b {
            match d.feed(std::slice::from_ref(byte)) {
                Ok(f) => got.extend(f),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        // The same frames (or the same refusal) however the stream is split.
        match (whole, err) {
            (Ok(w), None) => assert_eq!(w, got),
            (Err(_), Some(_)) => {}
            (w, e) => panic!("split-dependent result: {w:?} vs {e:?}"),
        }
        Ok(())
    });
}

#[test]
fn fuzz_handshake_frames() {
    let (private, public) = generate_keypair().unwrap();
    // A real WELCOME and REFUSED as seeds for the client; a real HELLO for the service.
    let mut s = ServerSession::new(&private).unwrap();
    let mut c = ClientSession::new(&public).unwrap();
    let hello = c.start().unwrap();
    s.receive_data(&hello).unwrap();
    let welcome = s.data_to_send();
    let mut r = ServerSession::new(&private).unwrap();
    r.refuse(Status::EDQUOT, "quota").unwrap();
    let refused = r.data_to_send();
    let seeds = vec![welcome.clone(), refused, welcome[4..].to_vec()];
    fuzz("client handshake", 5, &seeds, |b| {
        let mut c = ClientSession::new(&public).unwrap();
        c.start().unwrap();
        c.receive_data(b).map(|_| ())
    });
    let seeds = vec![hello.clone(), hello[4..].to_vec()];
    fuzz("service handshake", 6, &seeds, |b| {
        let mut s = ServerSession::new(&private).unwrap();
        s.receive_data(b).map(|_| ())
    });
    let bodies = vec![
        welcome[4..].to_vec(),
        hello[4..].to_vec(),
        vec![1, 3, 0, 11, b'x'],
    ];
    fuzz("split_handshake/parse_refusal", 7, &bodies, |b| {
        let (kind, payload) = split_handshake(b)?;
        if kind == FrameKind::REFUSED {
            match parse_refusal(payload) {
                Error::Refused { status, .. } => assert_ne!(status, Status::OK),
                Error::Protocol(_) => {}
                e => panic!("{e:?}"),
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_transport_frames_in_open_state() {
    // The client, established and with requests pending, fed mutated reply frames:
    // almost all fail authentication; the fuzzer proves none panics.
    let (private, public) = generate_keypair().unwrap();
    let mut rng = Rng(8);
    let mut template = Vec::new();
    for _ in 0..8 {
        let mut s = ServerSession::new(&private).unwrap();
        let mut c = ClientSession::new(&public).unwrap();
        s.receive_data(&c.start().unwrap()).unwrap();
        c.receive_data(&s.data_to_send()).unwrap();
        let (_, f) = c
            .send_request(&RequestBody::Post { handle: [1; 16] }, None)
            .unwrap();
        s.receive_data(&f).unwrap();
        let rep = Reply {
            opcode: Opcode::POST,
            req_id: 1,
            status: Status::OK,
            body: ReplyBody::Empty,
        };
        s.send_reply(&rep, None).unwrap();
        template.push((s.data_to_send(), c));
    }
    let seeds: Vec<Vec<u8>> = template.iter().map(|(f, _)| f.clone()).collect();
    fuzz("client transport", 9, &seeds, |b| {
        let k = rng.below(template.len());
        // Each case on a fresh copy of nothing: sessions are not Clone (nonces), so we
        // feed a session until it closes, then replace it.
        let (_, c) = &mut template[k];
        let r = c.receive_data(b).map(|_| ());
        if c.failure().is_some() {
            let mut s = ServerSession::new(&private).unwrap();
            let mut fresh = ClientSession::new(&public).unwrap();
            s.receive_data(&fresh.start().unwrap()).unwrap();
            fresh.receive_data(&s.data_to_send()).unwrap();
            fresh
                .send_request(&RequestBody::Post { handle: [1; 16] }, None)
                .unwrap();
            *c = fresh;
        }
        r
    });
}

/// A client session in RESUMING with requests pending (ids 1..=3 awaited, 4 queued
/// while detached), over a fresh connection to `s`.
fn resuming_pair(private: &[u8], public: &[u8]) -> (ServerSession, ClientSession) {
    let mut s = ServerSession::new(private).unwrap();
    let mut c = ClientSession::new(public).unwrap();
    s.receive_data(&c.start().unwrap()).unwrap();
    c.receive_data(&s.data_to_send()).unwrap();
    for _ in 0..3 {
        c.send_request(&RequestBody::Post { handle: [1; 16] }, Some(&[7; 16]))
            .unwrap();
    }
    c.detach().unwrap();
    c.send_request(&RequestBody::Ping, None).unwrap();
    let mut s2 = ServerSession::new(private).unwrap();
    let mut fresh = ClientSession::new(public).unwrap();
    s2.receive_data(&fresh.start().unwrap()).unwrap();
    fresh.receive_data(&s2.data_to_send()).unwrap();
    c.resume_over(fresh).unwrap();
    s2.receive_data(&c.take_outgoing()).unwrap();
    (s2, c)
}

#[test]
fn fuzz_resuming_client() {
    // The RESUME's reply and what follows it (replays, ESTALE), mutated: a resuming
    // session either carries on, or closes with a protocol, integrity or Lost error.
    let (private, public) = generate_keypair().unwrap();
    let mut seeds = Vec::new();
    let mut pairs = Vec::new();
    for (status, last) in [(Status::OK, 2u64), (Status::OK, 0), (Status::ENOENT, 0)] {
        let (mut s, c) = resuming_pair(&private, &public);
        let body = if status == Status::OK {
            ReplyBody::LastReqId(last)
        } else {
            ReplyBody::Refusal(b"no such session".to_vec())
        };
        let reply = Reply {
            opcode: Opcode::RESUME,
            req_id: 5,
            status,
            body,
        };
        s.send_reply(&reply, None).unwrap();
        let stale = Reply {
            opcode: Opcode::RESUME,
            req_id: 1,
            status: Status::ESTALE,
            body: ReplyBody::Refusal(b"reply lost".to_vec()),
        };
        s.send_reply(&stale, None).unwrap();
        seeds.push(s.data_to_send());
        pairs.push(c);
    }
    let mut rng = Rng(11);
    fuzz("resuming client", 12, &seeds, |b| {
        let k = rng.below(pairs.len());
        let c = &mut pairs[k];
        let r = match c.receive_data(b) {
            Err(Error::Lost(_)) => Ok(()),
            other => other.map(|_| ()),
        };
        if c.failure().is_some() || c.state() != State::Resuming {
            *c = resuming_pair(&private, &public).1;
        }
        r
    });
}

#[test]
fn fuzz_ring_indices() {
    let mut rng = Rng(10);
    let mut checked = 0usize;
    for _ in 0..cases() {
        let cap_raw = match rng.below(4) {
            0 => rng.next(),
            1 => 1u64 << rng.below(64),
            _ => 32768u64 << rng.below(6),
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _ = check_header(rng.next(), rng.next() % 3, cap_raw, 65536);
            let Ok(cap) = check_capacity(cap_raw) else {
                return;
            };
            let mine = rng.next();
            let theirs = match rng.below(3) {
                0 => rng.next(),
                1 => mine.wrapping_add(rng.next() % (2 * cap)),
                _ => mine.wrapping_sub(rng.next() % (2 * cap)),
            };
            let want = rng.below(3 * cap as usize);
            let p = ProducerIndex::new(cap, mine).unwrap();
            if let Ok(s) = p.plan_write(theirs, want) {
                // Spans stay inside the data area and never exceed the free room.
                assert!(s.first.0 + s.first.1 <= cap as usize);
                assert!(s.len() as u64 <= cap - p.used(theirs).unwrap());
                assert!(s.second.1 == 0 || s.first.0 + s.first.1 == cap as usize);
            }
            let c = ConsumerIndex::new(cap, mine).unwrap();
            if let Ok(s) = c.plan_read(theirs, want) {
                assert!(s.first.0 + s.first.1 <= cap as usize);
                assert!(s.len() as u64 <= c.available(theirs).unwrap());
                assert!(s.second.1 == 0 || s.first.0 + s.first.1 == cap as usize);
            }
        }));
        assert!(result.is_ok(), "ring index arithmetic panicked");
        checked += 1;
    }
    assert_eq!(checked, cases());
}
