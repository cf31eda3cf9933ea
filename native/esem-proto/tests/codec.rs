//! Codec properties: round trips, the canonical-encoding property (whatever parses
//! re-encodes to exactly the bytes received), the framing rules of PROTOCOL.md 2 and
//! the field rules and decoding order of 5.2 / 6.2.

mod common;

use esem_proto::consts::*;
use esem_proto::frame::{encode_frame, FrameDecoder};
use esem_proto::msg::*;
use esem_proto::Error;
use proptest::prelude::*;

fn reencode_request(bytes: &[u8]) -> Option<Vec<u8>> {
    let d = decode_request(bytes).ok()?;
    let mut out = encode_request(&d.message, d.mac.is_some()).expect("decoded encodes");
    assert_eq!(out, d.signed);
    if let Some(m) = d.mac {
        out.extend_from_slice(&m);
    }
    Some(out)
}

fn reencode_reply(bytes: &[u8]) -> Option<Vec<u8>> {
    let d = decode_reply(bytes).ok()?;
    let mut out = encode_reply(&d.message, d.mac.is_some()).expect("decoded encodes");
    assert_eq!(out, d.signed);
    if let Some(m) = d.mac {
        out.extend_from_slice(&m);
    }
    Some(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_round_trip(req in common::request(), mac in proptest::option::of(any::<[u8; 32]>())) {
        let mut bytes = encode_request(&req, mac.is_some()).unwrap();
        if let Some(m) = mac { bytes.extend_from_slice(&m); }
        let d = decode_request(&bytes).unwrap();
        prop_assert_eq!(&d.message, &req);
        prop_assert_eq!(d.mac, mac);
        prop_assert_eq!(reencode_request(&bytes), Some(bytes));
    }

    #[test]
    fn reply_round_trip(rep in common::reply(), mac in proptest::option::of(any::<[u8; 32]>())) {
        let mut bytes = encode_reply(&rep, mac.is_some()).unwrap();
        if let Some(m) = mac { bytes.extend_from_slice(&m); }
        let d = decode_reply(&bytes).unwrap();
        prop_assert_eq!(&d.message, &rep);
        prop_assert_eq!(d.mac, mac);
    }

    /// Canonical: any bytes that decode re-encode to themselves (mutations of valid
    /// messages, so that many of them do parse).
    #[test]
    fn request_canonical(req in common::request(), at in any::<prop::sample::Index>(),
                         byte in any::<u8>(), cut in any::<prop::sample::Index>(), mac in any::<bool>()) {
        let mut bytes = encode_request(&req, mac).unwrap();
        if mac { bytes.extend_from_slice(&[7u8; 32]); }
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(cut.index(bytes.len() + 1).max(1));
        if let Some(out) = reencode_request(&bytes) { prop_assert_eq!(out, bytes); }
    }

    #[test]
    fn reply_canonical(rep in common::reply(), at in any::<prop::sample::Index>(),
                       byte in any::<u8>(), extra in proptest::collection::vec(any::<u8>(), 0..3)) {
        let mut bytes = encode_reply(&rep, false).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.extend_from_slice(&extra);
        if let Some(out) = reencode_reply(&bytes) { prop_assert_eq!(out, bytes); }
    }

    /// The frame decoder yields the same frames however the stream is split.
    #[test]
    fn frames_any_split(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8),
                        cuts in proptest::collection::vec(1usize..50, 1..40)) {
        let stream: Vec<u8> = bodies.iter().flat_map(|b| encode_frame(b).unwrap()).collect();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let (mut pos, mut k) = (0, 0);
        while pos < stream.len() {
            let n = cuts[k % cuts.len()].min(stream.len() - pos);
            got.extend(dec.feed(&stream[pos..pos + n]).unwrap());
            pos += n;
            k += 1;
        }
        prop_assert_eq!(got, bodies);
        prop_assert_eq!(dec.buffered(), 0);
    }
}

fn is_protocol(r: Result<impl std::fmt::Debug, Error>) -> bool {
    matches!(r, Err(Error::Protocol(_)))
}

#[test]
fn frame_length_refused_before_body() {
    for bad in [0u32, (MAX_FRAME_BODY + 1) as u32, u32::MAX] {
        let mut dec = FrameDecoder::new();
        // Exactly the four length bytes, no body: refused at once.
        assert!(is_protocol(dec.feed(&bad.to_be_bytes())), "length {bad}");
    }
    let mut dec = FrameDecoder::new();
    assert_eq!(
        dec.feed(&(MAX_FRAME_BODY as u32).to_be_bytes())
            .unwrap()
            .len(),
        0
    );
    assert!(encode_frame(&[]).is_err());
    assert!(encode_frame(&vec![0; MAX_FRAME_BODY + 1]).is_err());
    assert_eq!(
        encode_frame(&vec![0; MAX_FRAME_BODY]).unwrap().len(),
        MAX_FRAME_BODY + 4
    );
}

fn header(op: u8, flags: u8) -> Vec<u8> {
    let mut v = vec![VERSION, op, flags];
    v.extend_from_slice(&1u64.to_be_bytes());
    v
}

#[test]
fn request_field_rules() {
    let h = [0u8; 16];
    let ok = |b: &[u8]| decode_request(b).is_ok();
    // PING: the header alone.
    assert!(ok(&header(11, 0)));
    // Truncated header, other version, unknown flags, no MAC room, unknown opcodes.
    assert!(is_protocol(decode_request(&header(11, 0)[..10])));
    let mut v = header(11, 0);
    v[0] = 2;
    assert!(is_protocol(decode_request(&v)));
    assert!(is_protocol(decode_request(&header(11, 2))));
    assert!(is_protocol(decode_request(&header(11, 1))));
    let mut m = header(11, 1);
    m.extend_from_slice(&[0; 32]);
    assert!(ok(&m));
    for op in [0u8, 16, 255] {
        assert!(is_protocol(decode_request(&header(op, 0))), "opcode {op}");
    }
    // Trailing byte.
    let mut v = header(11, 0);
    v.push(0);
    assert!(is_protocol(decode_request(&v)));
    // OPEN: unknown oflag bit, key of 1..15 or 33 bytes, name of 0, 1 or 253 bytes,
    // invalid UTF-8.
    let open = |oflag: u8, key: &[u8], name: &[u8]| {
        let mut v = header(1, 0);
        v.push(oflag);
        v.extend_from_slice(&0o600u16.to_be_bytes());
        v.extend_from_slice(&1u32.to_be_bytes());
        v.push(key.len() as u8);
        v.extend_from_slice(key);
        v.push(name.len() as u8);
        v.extend_from_slice(name);
        v
    };
    assert!(ok(&open(7, &[1; 16], b"/x")));
    assert!(ok(&open(0, &[], b"/x")));
    // FOREIGN (8) is known; every bit above it is refused, alone or beside known ones.
    assert!(ok(&open(open_flag::FOREIGN, &[], b"/x")));
    assert!(ok(&open(open_flag::KNOWN, &[1; 16], b"/x")));
    assert_eq!(open_flag::KNOWN, 15);
    for bit in 4..8 {
        assert!(
            is_protocol(decode_request(&open(1 << bit, &[], b"/x"))),
            "bit {bit}"
        );
        assert!(is_protocol(decode_request(&open(
            (1 << bit) | 9,
            &[],
            b"/x"
        ))));
    }
    assert!(is_protocol(decode_request(&open(1, &[1; 15], b"/x"))));
    assert!(is_protocol(decode_request(&open(1, &[1; 33], b"/x"))));
    assert!(is_protocol(decode_request(&open(1, &[], b"/"))));
    assert!(is_protocol(decode_request(&open(1, &[], b""))));
    assert!(ok(&open(1, &[], &[b'a'; 252])));
    assert!(is_protocol(decode_request(&open(1, &[], &[b'a'; 253]))));
    assert!(is_protocol(decode_request(&open(1, &[], b"/\xff"))));
    assert!(is_protocol(decode_request(&open(1, &[], b"/\xed\xa0\x80")))); // surrogate
                                                                           // WAIT: wait modes, timeouts.
    let wait = |mode: u8, t: u64| {
        let mut v = header(4, 0);
        v.extend_from_slice(&h);
        v.push(mode);
        v.extend_from_slice(&t.to_be_bytes());
        v
    };
    assert!(ok(&wait(0, 0)) && ok(&wait(1, 0)) && ok(&wait(2, MAX_TIMEOUT_NS)));
    assert!(is_protocol(decode_request(&wait(3, 0))));
    assert!(is_protocol(decode_request(&wait(1, 1))));
    assert!(is_protocol(decode_request(&wait(2, MAX_TIMEOUT_NS + 1))));
    // LIST: the cursor is a short string of 0..252 bytes of strict UTF-8, any text.
    let list = |after: &[u8]| {
        let mut v = header(9, 0);
        v.push(after.len() as u8);
        v.extend_from_slice(after);
        v
    };
    for after in [&b""[..], b"/", b"a", b"/x/y", &[b'z'; 252]] {
        let d = decode_request(&list(after)).unwrap();
        assert_eq!(
            d.message.body,
            RequestBody::List {
                after: String::from_utf8(after.to_vec()).unwrap()
            }
        );
    }
    assert!(is_protocol(decode_request(&list(&[b'z'; 253]))));
    assert!(is_protocol(decode_request(&list(b"/\xff"))));
    assert!(is_protocol(decode_request(&header(9, 0)))); // no length byte: the old offset-less shape
    let mut old = header(9, 0);
    old.extend_from_slice(&2u32.to_be_bytes()); // the old `offset u32`: length 0 + 3 trailing
    assert!(is_protocol(decode_request(&old)));
    let mut short = list(b"abc");
    short.pop();
    assert!(is_protocol(decode_request(&short)));
    // RECLAIM: a name, as UNLINK; MAC'd under K for a key-bound semaphore.
    let reclaim = |name: &[u8], flags: u8| {
        let mut v = header(13, flags);
        v.push(name.len() as u8);
        v.extend_from_slice(name);
        if flags & FLAG_HAS_MAC != 0 {
            v.extend_from_slice(&[3; 32]);
        }
        v
    };
    let d = decode_request(&reclaim(b"/r", 0)).unwrap();
    assert_eq!(d.message.body, RequestBody::Reclaim { name: "/r".into() });
    let d = decode_request(&reclaim(b"/r", FLAG_HAS_MAC)).unwrap();
    assert_eq!(d.mac, Some([3; 32]));
    assert!(is_protocol(decode_request(&reclaim(b"/", 0))));
    assert!(is_protocol(decode_request(&header(13, 0))));
    // RESUME: session (32), secret (32), count u16, count u64 ids, nothing more.
    let resume = |count: u16, ids: &[u64], flags: u8| {
        let mut v = header(14, flags);
        v.extend_from_slice(&[5; 32]);
        v.extend_from_slice(&[6; 32]);
        v.extend_from_slice(&count.to_be_bytes());
        for id in ids {
            v.extend_from_slice(&id.to_be_bytes());
        }
        v
    };
    let d = decode_request(&resume(2, &[3, 9], 0)).unwrap();
    assert_eq!(
        d.message.body,
        RequestBody::Resume {
            session: [5; 32],
            secret: [6; 32],
            awaited: vec![3, 9]
        }
    );
    assert!(ok(&resume(0, &[], 0)));
    assert!(is_protocol(decode_request(&resume(3, &[3, 9], 0))));
    assert!(is_protocol(decode_request(&resume(1, &[3, 9], 0))));
    let mut cut = resume(1, &[3], 0);
    cut.pop();
    assert!(is_protocol(decode_request(&cut)));
    assert!(is_protocol(decode_request(&resume(0, &[], 0)[..75])));
    // More than RESUME_MAX_AWAITED parses: refusing it (EINVAL) is the service's part.
    let many: Vec<u64> = (1..=RESUME_MAX_AWAITED as u64 + 1).collect();
    assert!(ok(&resume(many.len() as u16, &many, 0)));
    // A count that cannot fit is a short read, not an allocation.
    assert!(is_protocol(decode_request(&resume(u16::MAX, &[1], 0))));
    // END: the header alone.
    assert!(ok(&header(15, 0)));
    let mut end = header(15, 0);
    end.push(0);
    assert!(is_protocol(decode_request(&end)));
    // Largest request: a MAC'd OPEN with a 32-byte key and a 252-byte name: 336 bytes.
    let req = Request {
        req_id: 9,
        body: RequestBody::Open {
            oflag: 1,
            mode: 0,
            value: 0,
            key: Some(vec![1; 32]),
            name: format!("/{}", "n".repeat(251)),
        },
    };
    assert_eq!(encode_request(&req, true).unwrap().len() + MAC_BYTES, 336);
    // Oversize is refused first, before anything else.
    let mut big = vec![9u8; MAX_PLAINTEXT + 1];
    big[0] = 9;
    assert_eq!(
        decode_request(&big),
        Err(Error::Protocol("request too large".into()))
    );
}

#[test]
fn encoder_refuses_what_decoder_refuses() {
    let open = |oflag, key: Option<Vec<u8>>, name: &str| Request {
        req_id: 1,
        body: RequestBody::Open {
            oflag,
            mode: 0,
            value: 0,
            key,
            name: name.into(),
        },
    };
    assert!(encode_request(&open(open_flag::FOREIGN | 1, None, "/x"), false).is_ok());
    assert!(matches!(
        encode_request(&open(16, None, "/x"), false),
        Err(Error::Misuse(_))
    ));
    let list = |after: String| Request {
        req_id: 1,
        body: RequestBody::List { after },
    };
    assert!(encode_request(&list("é".repeat(126)), false).is_ok());
    assert!(matches!(
        encode_request(&list(format!("x{}", "é".repeat(126))), false),
        Err(Error::Misuse(_))
    ));
    let reclaim = Request {
        req_id: 1,
        body: RequestBody::Reclaim { name: "/".into() },
    };
    assert!(matches!(
        encode_request(&reclaim, false),
        Err(Error::Misuse(_))
    ));
    assert!(matches!(
        encode_request(&open(1, Some(vec![0; 8]), "/x"), false),
        Err(Error::Misuse(_))
    ));
    assert!(matches!(
        encode_request(&open(1, None, "/"), false),
        Err(Error::Misuse(_))
    ));
    let w = Request {
        req_id: 1,
        body: RequestBody::Wait {
            handle: [0; 16],
            mode: WaitMode::BLOCK,
            timeout_ns: 5,
        },
    };
    assert!(matches!(encode_request(&w, false), Err(Error::Misuse(_))));
    let r = Reply {
        opcode: Opcode::POST,
        req_id: 1,
        status: Status::OK,
        body: ReplyBody::Value(1),
    };
    assert!(matches!(encode_reply(&r, false), Err(Error::Misuse(_))));
    // RESUME's OK reply is LastReqId only; no other opcode carries one.
    let mut r = Reply {
        opcode: Opcode::RESUME,
        req_id: 1,
        status: Status::OK,
        body: ReplyBody::Value(1),
    };
    assert!(matches!(encode_reply(&r, false), Err(Error::Misuse(_))));
    r.body = ReplyBody::LastReqId(1);
    assert!(encode_reply(&r, false).is_ok());
    r.opcode = Opcode::PING;
    assert!(matches!(encode_reply(&r, false), Err(Error::Misuse(_))));
    // RESUME and END are never MAC'd.
    assert!(!may_carry_mac(Opcode::RESUME) && !may_carry_mac(Opcode::END));
}

#[test]
fn reply_field_rules() {
    let rep = |op: u8, status: u16, payload: &[u8]| {
        let mut v = header(op, 0);
        v.extend_from_slice(&status.to_be_bytes());
        v.extend_from_slice(payload);
        v
    };
    assert!(decode_reply(&rep(5, 0, b"")).is_ok());
    assert!(is_protocol(decode_reply(&rep(5, 0, b"x"))));
    assert!(is_protocol(decode_reply(&rep(5, 14, b""))));
    assert!(is_protocol(decode_reply(&rep(16, 0, b""))));
    // ESTALE (13): a reply lost across a restart, with its text.
    let d = decode_reply(&rep(5, 13, b"lost")).unwrap();
    assert_eq!(d.message.status, Status::ESTALE);
    // RESUME's OK reply is exactly a u64 (last_req_id); its refusals are text; END's
    // OK reply is empty.
    let d = decode_reply(&rep(14, 0, &7u64.to_be_bytes())).unwrap();
    assert_eq!(d.message.body, ReplyBody::LastReqId(7));
    assert!(is_protocol(decode_reply(&rep(14, 0, b""))));
    assert!(is_protocol(decode_reply(&rep(14, 0, &[0; 4]))));
    assert!(is_protocol(decode_reply(&rep(14, 0, &[0; 9]))));
    assert!(decode_reply(&rep(14, 1, b"no such session")).is_ok());
    assert!(decode_reply(&rep(15, 0, b"")).is_ok());
    assert!(is_protocol(decode_reply(&rep(15, 0, b"x"))));
    // RECLAIM's OK reply is exactly a u32 (units released), nothing shorter or longer.
    let d = decode_reply(&rep(13, 0, &5u32.to_be_bytes())).unwrap();
    assert_eq!(d.message.body, ReplyBody::Value(5));
    assert!(is_protocol(decode_reply(&rep(13, 0, b""))));
    assert!(is_protocol(decode_reply(&rep(13, 0, &[0; 5]))));
    // OPEN: handle (16), created (1), sem_id (u64): exactly 25 bytes.
    let mut open = [0u8; 25];
    open[17..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    let d = decode_reply(&rep(1, 0, &open)).unwrap();
    assert_eq!(
        d.message.body,
        ReplyBody::Handle {
            handle: [0; 16],
            created: false,
            sem_id: 0x0102_0304_0506_0708
        }
    );
    assert!(is_protocol(decode_reply(&rep(1, 0, &open[..17]))));
    assert!(is_protocol(decode_reply(&rep(1, 0, &open[..24]))));
    assert!(is_protocol(decode_reply(&rep(1, 0, &[0; 26]))));
    open[16] = 2;
    assert!(is_protocol(decode_reply(&rep(1, 0, &open))));
    assert!(is_protocol(decode_reply(&rep(1, 0, &open[..16]))));
    assert!(is_protocol(decode_reply(&rep(6, 0, &[0; 3]))));
    assert!(decode_reply(&rep(6, 0, &[0; 4])).is_ok());
    assert!(decode_reply(&rep(9, 0, b"")).is_ok());
    // Refusal text: up to 512 bytes, any bytes (decoded with replacement).
    assert!(decode_reply(&rep(5, 7, &[0xff; 512])).is_ok());
    assert!(is_protocol(decode_reply(&rep(5, 7, &[b'a'; 513]))));
    let d = decode_reply(&rep(5, 7, b"bad \xff")).unwrap();
    assert_eq!(d.message.message(), "bad \u{fffd}");
    // Every status decodes.
    for st in Status::ALL {
        let payload: &[u8] = if *st == Status::OK { b"" } else { b"why" };
        assert_eq!(
            decode_reply(&rep(2, st.wire(), payload))
                .unwrap()
                .message
                .status,
            *st
        );
    }
}
