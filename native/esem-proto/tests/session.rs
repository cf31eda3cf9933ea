//! The client session state machine (PROTOCOL.md 9) against this crate's responder:
//! handshake, pinning, REFUSED, matching, the MAC rules of 8.4, stickiness.

use esem_proto::consts::*;
use esem_proto::crypto::{generate_keypair, keybind_mac};
use esem_proto::frame::encode_frame;
use esem_proto::msg::*;
use esem_proto::session::{ClientSession, ServerSession, State};
use esem_proto::Error;

fn pair() -> (ClientSession, ServerSession) {
    let (private, public) = generate_keypair().unwrap();
    let mut c = ClientSession::new(&public).unwrap();
    let mut s = ServerSession::new(&private).unwrap();
    let hello = c.start().unwrap();
    assert_eq!(hello.len(), 54);
    assert!(s.receive_data(&hello).unwrap().is_empty());
    let welcome = s.data_to_send();
    assert_eq!(welcome.len(), 86); // 4 + 2 + 80: NK message 2 carries R
    assert!(c.receive_data(&welcome).unwrap().is_empty());
    assert_eq!(c.state(), State::Open);
    assert_eq!(c.session_id(), s.session_id());
    (c, s)
}

const KEY: &[u8] = b"0123456789abcdef0123";

fn post() -> RequestBody {
    RequestBody::Post { handle: [3; 16] }
}

#[test]
fn request_reply_exchange() {
    let (mut c, mut s) = pair();
    let (id, frame) = c.send_request(&post(), None).unwrap();
    assert_eq!(id, 1);
    let ev = s.receive_data(&frame).unwrap();
    assert_eq!(
        ev[0].request,
        Request {
            req_id: 1,
            body: post()
        }
    );
    assert!(ev[0].mac.is_none());
    s.send_reply(
        &Reply {
            opcode: Opcode::POST,
            req_id: 1,
            status: Status::OK,
            body: ReplyBody::Empty,
        },
        None,
    )
    .unwrap();
    let replies = c.receive_data(&s.data_to_send()).unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(c.pending(), 0);
    // Ids increase.
    assert_eq!(c.send_request(&RequestBody::Ping, None).unwrap().0, 2);
}

#[test]
fn wrong_pinned_key_fails_integrity() {
    let (private, public) = generate_keypair().unwrap();
    let (_, other_public) = generate_keypair().unwrap();
    let mut c = ClientSession::new(&other_public).unwrap();
    let mut s = ServerSession::new(&private).unwrap();
    let hello = c.start().unwrap();
    // The service cannot decrypt a HELLO sealed to another key.
    assert!(matches!(s.receive_data(&hello), Err(Error::Integrity(_))));
    // A WELCOME from a service with another key does not verify either.
    let (private2, public2) = generate_keypair().unwrap();
    let mut c = ClientSession::new(&public2).unwrap();
    let mut impostor = ServerSession::new(&private).unwrap();
    let mut real = ServerSession::new(&private2).unwrap();
    let hello = c.start().unwrap();
    real.receive_data(&hello).unwrap();
    let mut c2 = ClientSession::new(&public).unwrap();
    impostor.receive_data(&c2.start().unwrap()).unwrap();
    let forged = impostor.data_to_send();
    assert!(matches!(c.receive_data(&forged), Err(Error::Integrity(_))));
    assert_eq!(c.state(), State::Closed);
    // Sticky.
    assert!(matches!(
        c.receive_data(&real.data_to_send()),
        Err(Error::Integrity(_))
    ));
    assert!(c.send_request(&RequestBody::Ping, None).is_err());
}

#[test]
fn refused_maps_status() {
    let (private, public) = generate_keypair().unwrap();
    let mut c = ClientSession::new(&public).unwrap();
    let mut s = ServerSession::new(&private).unwrap();
    c.start().unwrap();
    s.refuse(Status::EDQUOT, "too many sessions").unwrap();
    match c.receive_data(&s.data_to_send()) {
        Err(Error::Refused {
            status: Status::EDQUOT,
            text,
        }) => assert_eq!(text, "too many sessions"),
        other => panic!("{other:?}"),
    }
    // A refusal with status OK, an unknown status, or too short is a protocol error.
    for payload in [&[0u8, 0][..], &[0, 99], &[0]] {
        let mut c = ClientSession::new(&public).unwrap();
        c.start().unwrap();
        let mut body = vec![VERSION, FrameKind::REFUSED.wire()];
        body.extend_from_slice(payload);
        assert!(matches!(
            c.receive_data(&encode_frame(&body).unwrap()),
            Err(Error::Protocol(_))
        ));
    }
}

#[test]
fn frames_before_start_or_in_wrong_kind_are_refused() {
    let (private, public) = generate_keypair().unwrap();
    let mut c = ClientSession::new(&public).unwrap();
    let mut s = ServerSession::new(&private).unwrap();
    let mut c2 = ClientSession::new(&public).unwrap();
    s.receive_data(&c2.start().unwrap()).unwrap();
    assert!(matches!(
        c.receive_data(&s.data_to_send()),
        Err(Error::Protocol(_))
    ));
    // A HELLO sent to a client.
    let mut c = ClientSession::new(&public).unwrap();
    let hello = c.start().unwrap();
    assert!(matches!(c.receive_data(&hello), Err(Error::Protocol(_))));
}

fn reply_frame(s: &mut ServerSession, rep: Reply, mac_key: Option<&[u8]>) -> Vec<u8> {
    s.send_reply(&rep, mac_key).unwrap();
    s.data_to_send()
}

#[test]
fn matching_rules() {
    let ok = |opcode, req_id| Reply {
        opcode,
        req_id,
        status: Status::OK,
        body: ReplyBody::Empty,
    };
    // Unknown id.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    let f = reply_frame(&mut s, ok(Opcode::POST, 2), None);
    assert!(matches!(c.receive_data(&f), Err(Error::Protocol(_))));
    // Wrong opcode.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    let f = reply_frame(&mut s, ok(Opcode::CLOSE, 1), None);
    assert!(matches!(c.receive_data(&f), Err(Error::Protocol(_))));
    // Second reply to one request.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    let f1 = reply_frame(&mut s, ok(Opcode::POST, 1), None);
    let f2 = reply_frame(&mut s, ok(Opcode::POST, 1), None);
    c.receive_data(&f1).unwrap();
    assert!(matches!(c.receive_data(&f2), Err(Error::Protocol(_))));
    // Replies in any order.
    let (mut c, mut s) = pair();
    let (_, f1) = c.send_request(&post(), None).unwrap();
    let (_, f2) = c.send_request(&RequestBody::Ping, None).unwrap();
    s.receive_data(&[f1, f2].concat()).unwrap();
    let a = reply_frame(&mut s, ok(Opcode::PING, 2), None);
    let b = reply_frame(&mut s, ok(Opcode::POST, 1), None);
    assert_eq!(c.receive_data(&[a, b].concat()).unwrap().len(), 2);
}

#[test]
fn mac_rules() {
    let ok = |req_id| Reply {
        opcode: Opcode::POST,
        req_id,
        status: Status::OK,
        body: ReplyBody::Empty,
    };
    let refused = |req_id| Reply {
        opcode: Opcode::POST,
        req_id,
        status: Status::EKEYREJECTED,
        body: ReplyBody::Refusal(b"no".to_vec()),
    };
    // MAC'd request, OK reply with a valid MAC: accepted; the service verifies the request.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), Some(KEY)).unwrap();
    let ev = s.receive_data(&f).unwrap();
    s.verify(&ev[0], KEY).unwrap();
    assert!(s.verify(&ev[0], b"another key, 16+").is_err());
    let f = reply_frame(&mut s, ok(1), Some(KEY));
    assert_eq!(c.receive_data(&f).unwrap()[0].status, Status::OK);
    // MAC'd request, OK reply without a MAC: Integrity.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), Some(KEY)).unwrap();
    s.receive_data(&f).unwrap();
    let f = reply_frame(&mut s, ok(1), None);
    assert!(matches!(c.receive_data(&f), Err(Error::Integrity(_))));
    // ... with a MAC under another key: Integrity.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), Some(KEY)).unwrap();
    s.receive_data(&f).unwrap();
    let f = reply_frame(&mut s, ok(1), Some(b"wrong key wrong key"));
    assert!(matches!(c.receive_data(&f), Err(Error::Integrity(_))));
    // ... a refusal without a MAC: accepted; with a bad MAC: Integrity.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), Some(KEY)).unwrap();
    let (_, g) = c.send_request(&post(), Some(KEY)).unwrap();
    s.receive_data(&[f, g].concat()).unwrap();
    let f = reply_frame(&mut s, refused(1), None);
    assert_eq!(c.receive_data(&f).unwrap()[0].status, Status::EKEYREJECTED);
    let f = reply_frame(&mut s, refused(2), Some(b"wrong key wrong key"));
    assert!(matches!(c.receive_data(&f), Err(Error::Integrity(_))));
    // Unsigned request, MAC'd reply: Protocol.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    let f = reply_frame(&mut s, ok(1), Some(KEY));
    assert!(matches!(c.receive_data(&f), Err(Error::Protocol(_))));
}

#[test]
fn tampered_replayed_and_reordered_frames_fail() {
    let ok = |req_id| Reply {
        opcode: Opcode::POST,
        req_id,
        status: Status::OK,
        body: ReplyBody::Empty,
    };
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    let (_, g) = c.send_request(&post(), None).unwrap();
    s.receive_data(&[f, g].concat()).unwrap();
    let a = reply_frame(&mut s, ok(1), None);
    let mut bad = a.clone();
    bad[10] ^= 1;
    assert!(matches!(c.receive_data(&bad), Err(Error::Integrity(_))));
    // Replay.
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    let a = reply_frame(&mut s, ok(1), None);
    c.receive_data(&a).unwrap();
    assert!(matches!(c.receive_data(&a), Err(Error::Integrity(_))));
    // The service refuses a request id that does not increase (a replayed frame fails
    // authentication first).
    let (mut c, mut s) = pair();
    let (_, f) = c.send_request(&post(), None).unwrap();
    s.receive_data(&f).unwrap();
    assert!(s.receive_data(&f).is_err());
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn mac_construction() {
    // MAC_DOMAIN || session_id || direction || message under keyed BLAKE2s-256; the
    // direction byte separates requests from replies.
    let sid = [5u8; 32];
    let a = keybind_mac(KEY, &sid, Direction::TO_SERVICE, b"m").unwrap();
    let b = keybind_mac(KEY, &sid, Direction::TO_CLIENT, b"m").unwrap();
    assert_ne!(a, b);
    assert_ne!(
        a,
        keybind_mac(KEY, &[6; 32], Direction::TO_SERVICE, b"m").unwrap()
    );
}

#[test]
fn oversized_request_refused_before_encryption() {
    let (mut c, mut s) = pair();
    let long = RequestBody::Stat {
        name: "x".repeat(300),
    };
    assert!(matches!(c.send_request(&long, None), Err(Error::Misuse(_))));
    // The nonce was not used: the next request still authenticates.
    let (_, f) = c.send_request(&post(), None).unwrap();
    assert_eq!(s.receive_data(&f).unwrap().len(), 1);
}

/// STAT and RECLAIM of a key-bound semaphore are MAC'd (PROTOCOL.md 8.2): the service
/// verifies the request, and the client takes an OK reply (STAT's JSON, RECLAIM's u32)
/// only with the MAC back under the same key.
#[test]
fn stat_and_reclaim_are_key_bound() {
    for (body, reply_body) in [
        (
            RequestBody::Stat { name: "/k".into() },
            ReplyBody::Json(b"{\"value\": 1}".to_vec()),
        ),
        (
            RequestBody::Reclaim { name: "/k".into() },
            ReplyBody::Value(2),
        ),
    ] {
        let op = body.opcode();
        let rep = Reply {
            opcode: op,
            req_id: 1,
            status: Status::OK,
            body: reply_body,
        };
        let (mut c, mut s) = pair();
        let (_, f) = c.send_request(&body, Some(KEY)).unwrap();
        let ev = s.receive_data(&f).unwrap();
        assert_eq!(ev[0].request.body, body);
        s.verify(&ev[0], KEY).unwrap();
        let f = reply_frame(&mut s, rep.clone(), Some(KEY));
        assert_eq!(c.receive_data(&f).unwrap()[0], rep);
        // The same OK reply without its MAC: Integrity (no full STAT, no RECLAIM count
        // on a key-bound semaphore without the key's proof).
        let (mut c, mut s) = pair();
        let (_, f) = c.send_request(&body, Some(KEY)).unwrap();
        s.receive_data(&f).unwrap();
        let f = reply_frame(&mut s, rep.clone(), None);
        assert!(
            matches!(c.receive_data(&f), Err(Error::Integrity(_))),
            "{op:?}"
        );
    }
}

/// CANCEL, LIST, PING and SWITCHLESS are never MAC'd: a key for one is refused as
/// misuse before anything is sent, and the request id is not spent.
#[test]
fn never_macd_opcodes_refuse_a_key() {
    let (mut c, _s) = pair();
    for body in [
        RequestBody::Cancel { target: 1 },
        RequestBody::List { after: "/a".into() },
        RequestBody::Ping,
        RequestBody::Switchless,
    ] {
        assert!(
            matches!(c.send_request(&body, Some(KEY)), Err(Error::Misuse(_))),
            "{body:?}"
        );
    }
    assert_eq!(c.pending(), 0);
    let (id, _) = c
        .send_request(
            &RequestBody::List {
                after: String::new(),
            },
            None,
        )
        .unwrap();
    assert_eq!(id, 1);
}
