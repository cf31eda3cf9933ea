//! Session resumption in the sans-I/O client session (PROTOCOL.md 16), against this
//! crate's responder: the WELCOME's secret, RESUME with the awaited ids, replayed
//! replies under the original session id, re-sends in order and byte-identical, a
//! refused RESUME, and the orderings a service may not use.

use esem_proto::consts::*;
use esem_proto::crypto::{
    generate_keypair, resume_verifier, verifier_matches, Initiator, Transport,
};
use esem_proto::frame::encode_frame;
use esem_proto::msg::*;
use esem_proto::session::{ClientSession, RequestIn, ServerSession, State};
use esem_proto::Error;

const KEY: &[u8] = b"0123456789abcdef0123";

struct Keys {
    private: [u8; 32],
    public: [u8; 32],
}

fn keys() -> Keys {
    let (private, public) = generate_keypair().unwrap();
    Keys { private, public }
}

fn connect(k: &Keys, secret: [u8; 32]) -> (ClientSession, ServerSession) {
    let mut c = ClientSession::new(&k.public).unwrap();
    let mut s = ServerSession::with_secret(&k.private, secret).unwrap();
    s.receive_data(&c.start().unwrap()).unwrap();
    c.receive_data(&s.data_to_send()).unwrap();
    assert_eq!(c.state(), State::Open);
    (c, s)
}

fn post() -> RequestBody {
    RequestBody::Post { handle: [3; 16] }
}

fn ok(op: Opcode, req_id: u64) -> Reply {
    Reply {
        opcode: op,
        req_id,
        status: Status::OK,
        body: ReplyBody::Empty,
    }
}

/// The frames' decrypted plaintexts, as the service reads them.
fn requests(s: &mut ServerSession, data: &[u8]) -> Vec<RequestIn> {
    s.receive_data(data).unwrap()
}

#[test]
fn welcome_carries_the_resumption_secret_and_nothing_else() {
    let k = keys();
    let (c, s) = connect(&k, [0x5a; 32]);
    assert_eq!(c.resume_secret(), Some(&[0x5a; 32]));
    assert_eq!(s.verifier(), resume_verifier(&[0x5a; 32]));
    assert!(verifier_matches(&s.verifier(), &[0x5a; 32]));
    assert!(!verifier_matches(&s.verifier(), &[0x5b; 32]));
    // A WELCOME whose payload is not exactly 32 bytes is refused like a forged one,
    // though it is a valid NK message 2 from the pinned service.
    for len in [0usize, 16, 31, 33, 64] {
        let mut c = ClientSession::new(&k.public).unwrap();
        let hello = c.start().unwrap();
        let mut hs = snow::Builder::new(NOISE_PROTOCOL_NAME.parse().unwrap())
            .prologue(NOISE_PROLOGUE)
            .unwrap()
            .local_private_key(&k.private)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut buf = [0u8; 256];
        hs.read_message(&hello[6..], &mut buf).unwrap();
        let n = hs.write_message(&vec![7u8; len], &mut buf).unwrap();
        let mut body = vec![VERSION, FrameKind::WELCOME.wire()];
        body.extend_from_slice(&buf[..n]);
        let r = c.receive_data(&encode_frame(&body).unwrap());
        assert!(
            matches!(r, Err(Error::Integrity(_))),
            "payload {len}: {r:?}"
        );
        assert_eq!(c.state(), State::Closed);
        assert!(!c.resumable());
    }
}

#[test]
fn resume_replays_and_resends_in_order_under_the_original_session_id() {
    let k = keys();
    let (mut c, mut s) = connect(&k, [1; 32]);
    let h = *c.session_id().unwrap();
    // 1 and 2 reach the service (MAC'd POSTs); 3 (a WAIT) is lost with the connection.
    let (id1, f1) = c.send_request(&post(), Some(KEY)).unwrap();
    let (id2, f2) = c.send_request(&post(), Some(KEY)).unwrap();
    let wait = RequestBody::Wait {
        handle: [3; 16],
        mode: WaitMode::BLOCK,
        timeout_ns: 0,
    };
    let (id3, _lost) = c.send_request(&wait, Some(KEY)).unwrap();
    assert_eq!(requests(&mut s, &[f1, f2].concat()).len(), 2);
    s.send_reply(&ok(Opcode::POST, id1), Some(KEY)).unwrap();
    assert_eq!(c.receive_data(&s.data_to_send()).unwrap().len(), 1);
    // The reply to 2, as the service sealed it (kept in its replay window).
    let reply2 = {
        let mut m = encode_reply(&ok(Opcode::POST, id2), true).unwrap();
        let mac = esem_proto::crypto::keybind_mac(KEY, &h, Direction::TO_CLIENT, &m).unwrap();
        m.extend_from_slice(&mac);
        m
    };

    // Connection lost. A request made while detached is queued, not sent.
    c.detach().unwrap();
    assert_eq!(c.state(), State::Detached);
    let (id4, f4) = c.send_request(&RequestBody::Ping, None).unwrap();
    assert!(f4.is_empty());
    assert_eq!((id1, id2, id3, id4), (1, 2, 3, 4));

    // A new connection; its WELCOME carries R_new.
    let (fresh, mut s2) = connect(&k, [2; 32]);
    assert_ne!(fresh.session_id(), Some(&h));
    c.resume_over(fresh).unwrap();
    assert_eq!(c.state(), State::Resuming);
    let ev = requests(&mut s2, &c.take_outgoing());
    assert_eq!(ev.len(), 1);
    assert!(ev[0].mac.is_none());
    assert_eq!(
        ev[0].request,
        Request {
            req_id: 5,
            body: RequestBody::Resume {
                session: h,
                secret: [1; 32],
                awaited: vec![2, 3, 4],
            }
        }
    );
    // Until the RESUME's reply, nothing goes out; a request made now waits too.
    let (id6, f6) = c.send_request(&post(), Some(KEY)).unwrap();
    assert!(f6.is_empty() && id6 == 6);

    // The service resumes: executed up to 2, whose reply it replays byte-identical.
    s2.adopt(h, 2, 5).unwrap();
    let resumed = Reply {
        opcode: Opcode::RESUME,
        req_id: 5,
        status: Status::OK,
        body: ReplyBody::LastReqId(2),
    };
    s2.send_reply(&resumed, None).unwrap();
    s2.send_plaintext(&reply2).unwrap();
    let replies = c.receive_data(&s2.data_to_send()).unwrap();
    assert_eq!(replies, vec![ok(Opcode::POST, 2)]);
    assert_eq!(c.state(), State::Open);
    assert_eq!(c.session_id(), Some(&h));
    assert_eq!(c.resume_secret(), Some(&[2; 32]));
    // The re-sends: 3 (lost), 4 and 6 (queued), in order, the plaintext of 3 as first
    // made, MACs binding the original session id.
    let ev = requests(&mut s2, &c.take_outgoing());
    let ids: Vec<u64> = ev.iter().map(|e| e.request.req_id).collect();
    assert_eq!(ids, vec![3, 4, 6]);
    assert_eq!(ev[0].request.body, wait);
    s2.verify(&ev[0], KEY).unwrap();
    s2.verify(&ev[2], KEY).unwrap();
    // Later requests number on; a reply under the new connection's own id would fail.
    s2.send_reply(&ok(Opcode::WAIT, 3), Some(KEY)).unwrap();
    s2.send_reply(&ok(Opcode::PING, 4), None).unwrap();
    s2.send_reply(&ok(Opcode::POST, 6), Some(KEY)).unwrap();
    assert_eq!(c.receive_data(&s2.data_to_send()).unwrap().len(), 3);
    assert_eq!(c.pending(), 0);
    assert_eq!(c.send_request(&RequestBody::Ping, None).unwrap().0, 7);
}

#[test]
fn a_mac_under_the_new_connection_id_is_refused_after_resume() {
    let k = keys();
    let (mut c, mut s) = connect(&k, [1; 32]);
    let h = *c.session_id().unwrap();
    let (_, f) = c.send_request(&post(), Some(KEY)).unwrap();
    requests(&mut s, &f);
    c.detach().unwrap();
    let (fresh, mut s2) = connect(&k, [2; 32]);
    c.resume_over(fresh).unwrap();
    requests(&mut s2, &c.take_outgoing());
    s2.send_reply(
        &Reply {
            opcode: Opcode::RESUME,
            req_id: 2,
            status: Status::OK,
            body: ReplyBody::LastReqId(1),
        },
        None,
    )
    .unwrap();
    // Not adopted: the service MACs under the new connection's hash, not h.
    s2.send_reply(&ok(Opcode::POST, 1), Some(KEY)).unwrap();
    assert_ne!(s2.session_id(), Some(&h));
    assert!(matches!(
        c.receive_data(&s2.data_to_send()),
        Err(Error::Integrity(_))
    ));
    assert!(!c.resumable());
    assert!(c.detach().is_err());
}

#[test]
fn refused_resume_loses_the_session() {
    let k = keys();
    for status in [Status::ENOENT, Status::EACCES] {
        let (mut c, mut s) = connect(&k, [1; 32]);
        let (_, f) = c.send_request(&post(), None).unwrap();
        requests(&mut s, &f);
        c.detach().unwrap();
        let (fresh, mut s2) = connect(&k, [2; 32]);
        c.resume_over(fresh).unwrap();
        requests(&mut s2, &c.take_outgoing());
        s2.send_reply(
            &Reply {
                opcode: Opcode::RESUME,
                req_id: 2,
                status,
                body: ReplyBody::Refusal(b"no such session".to_vec()),
            },
            None,
        )
        .unwrap();
        let e = c.receive_data(&s2.data_to_send()).unwrap_err();
        assert!(
            matches!(&e, Error::Lost(m) if m.contains(status.name())),
            "{e:?}"
        );
        assert!(!e.is_integrity());
        assert_eq!(c.state(), State::Closed);
        assert_eq!(c.pending(), 0);
        // Sticky, for every later call.
        assert!(matches!(
            c.send_request(&RequestBody::Ping, None),
            Err(Error::Lost(_))
        ));
    }
}

#[test]
fn nothing_but_the_resume_reply_comes_first() {
    let k = keys();
    let bad_firsts = [
        // A reply to an awaited request before the RESUME's (3).
        ok(Opcode::POST, 1),
        // A last_req_id above every request ever sent (1): 2 was only queued while
        // detached, 3 is the RESUME itself.
        Reply {
            opcode: Opcode::RESUME,
            req_id: 3,
            status: Status::OK,
            body: ReplyBody::LastReqId(2),
        },
        Reply {
            opcode: Opcode::RESUME,
            req_id: 3,
            status: Status::OK,
            body: ReplyBody::LastReqId(3),
        },
    ];
    for bad in bad_firsts {
        let (mut c, mut s) = connect(&k, [1; 32]);
        let (_, f) = c.send_request(&post(), None).unwrap();
        requests(&mut s, &f);
        c.detach().unwrap();
        c.send_request(&RequestBody::Ping, None).unwrap(); // 2, queued
        let (fresh, mut s2) = connect(&k, [2; 32]);
        c.resume_over(fresh).unwrap();
        requests(&mut s2, &c.take_outgoing());
        s2.send_reply(&bad, None).unwrap();
        assert!(matches!(
            c.receive_data(&s2.data_to_send()),
            Err(Error::Protocol(_))
        ));
        assert!(!c.resumable());
    }
}

#[test]
fn estale_answers_an_awaited_request() {
    let k = keys();
    let (mut c, mut s) = connect(&k, [1; 32]);
    let (id, f) = c.send_request(&post(), Some(KEY)).unwrap();
    requests(&mut s, &f);
    c.detach().unwrap();
    let (fresh, mut s2) = connect(&k, [2; 32]);
    c.resume_over(fresh).unwrap();
    requests(&mut s2, &c.take_outgoing());
    s2.adopt(*c.session_id().unwrap(), 1, 2).unwrap();
    s2.send_reply(
        &Reply {
            opcode: Opcode::RESUME,
            req_id: 2,
            status: Status::OK,
            body: ReplyBody::LastReqId(1),
        },
        None,
    )
    .unwrap();
    // The service no longer knows the request's opcode: ESTALE comes under RESUME's.
    let stale = Reply {
        opcode: Opcode::RESUME,
        req_id: id,
        status: Status::ESTALE,
        body: ReplyBody::Refusal(b"reply lost across a service restart".to_vec()),
    };
    s2.send_reply(&stale, None).unwrap();
    assert_eq!(c.receive_data(&s2.data_to_send()).unwrap(), vec![stale]);
    assert!(c.take_outgoing().is_empty()); // 1 is not re-sent: the service had it
    assert_eq!(Status::ESTALE.errno(), 116);
}

#[test]
fn estale_under_resume_only_on_a_resumed_session() {
    let k = keys();
    let stale = |req_id| Reply {
        opcode: Opcode::RESUME,
        req_id,
        status: Status::ESTALE,
        body: ReplyBody::Refusal(b"lost".to_vec()),
    };
    // Never resumed: a reply with another request's opcode is a protocol error.
    let (mut c, mut s) = connect(&k, [1; 32]);
    let (id, f) = c.send_request(&post(), None).unwrap();
    requests(&mut s, &f);
    s.send_reply(&stale(id), None).unwrap();
    assert!(matches!(
        c.receive_data(&s.data_to_send()),
        Err(Error::Protocol(_))
    ));
    // Resumed: an ESTALE under RESUME for an id that is not pending is one too.
    let (mut c, mut s) = connect(&k, [1; 32]);
    let (id, f) = c.send_request(&post(), None).unwrap();
    requests(&mut s, &f);
    c.detach().unwrap();
    let (fresh, mut s2) = connect(&k, [2; 32]);
    c.resume_over(fresh).unwrap();
    requests(&mut s2, &c.take_outgoing());
    s2.send_reply(
        &Reply {
            opcode: Opcode::RESUME,
            req_id: 2,
            status: Status::OK,
            body: ReplyBody::LastReqId(id),
        },
        None,
    )
    .unwrap();
    s2.send_reply(&stale(id + 7), None).unwrap();
    assert!(matches!(
        c.receive_data(&s2.data_to_send()),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn losing_the_connection_while_resuming_resumes_again() {
    let k = keys();
    let (mut c, mut s) = connect(&k, [1; 32]);
    let (_, f) = c.send_request(&post(), None).unwrap();
    requests(&mut s, &f);
    c.detach().unwrap();
    let (fresh, _gone) = connect(&k, [2; 32]);
    c.resume_over(fresh).unwrap();
    let _ = c.take_outgoing();
    c.detach().unwrap(); // that connection died before answering
    let (fresh, mut s3) = connect(&k, [3; 32]);
    c.resume_over(fresh).unwrap();
    let ev = requests(&mut s3, &c.take_outgoing());
    // The forgotten RESUME (2) is not awaited; the session's R is still the first.
    match &ev[0].request.body {
        RequestBody::Resume {
            secret, awaited, ..
        } => {
            assert_eq!(secret, &[1; 32]);
            assert_eq!(awaited, &vec![1]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ev[0].request.req_id, 3);
}

#[test]
fn only_an_established_session_detaches_and_only_over_a_fresh_one() {
    let k = keys();
    let mut c = ClientSession::new(&k.public).unwrap();
    assert!(c.detach().is_err());
    c.start().unwrap();
    assert!(c.detach().is_err());
    let (mut c, _s) = connect(&k, [1; 32]);
    let (fresh, _) = connect(&k, [2; 32]);
    assert!(matches!(c.resume_over(fresh), Err(Error::Misuse(_)))); // not detached
    c.detach().unwrap();
    let (mut used, _) = connect(&k, [2; 32]);
    used.send_request(&RequestBody::Ping, None).unwrap();
    assert!(matches!(c.resume_over(used), Err(Error::Misuse(_))));
    let unfinished = ClientSession::new(&k.public).unwrap();
    assert!(matches!(c.resume_over(unfinished), Err(Error::Misuse(_))));
    // RESUME is the session's own; END is an ordinary request without a MAC.
    assert!(matches!(
        c.send_request(
            &RequestBody::Resume {
                session: [0; 32],
                secret: [0; 32],
                awaited: vec![]
            },
            None
        ),
        Err(Error::Misuse(_))
    ));
    assert!(matches!(
        c.send_request(&RequestBody::End, Some(KEY)),
        Err(Error::Misuse(_))
    ));
}

#[test]
fn more_awaited_than_a_resume_may_list_is_lost() {
    let k = keys();
    let (mut c, _s) = connect(&k, [1; 32]);
    for _ in 0..=RESUME_MAX_AWAITED {
        c.send_request(&RequestBody::Ping, None).unwrap();
    }
    c.detach().unwrap();
    let (fresh, _) = connect(&k, [2; 32]);
    assert!(matches!(c.resume_over(fresh), Err(Error::Lost(_))));
    assert_eq!(c.state(), State::Closed);
}

#[test]
fn service_side_connection_rules() {
    let k = keys();
    let resume = RequestBody::Resume {
        session: [0; 32],
        secret: [0; 32],
        awaited: vec![],
    };
    let msg = |req_id: u64, body: RequestBody, mac: bool| {
        let mut m = encode_request(&Request { req_id, body }, mac).unwrap();
        if mac {
            m.extend_from_slice(&[0; 32]);
        }
        m
    };
    // RESUME after another request: a protocol error.
    let (mut t, mut s) = raw_pair(&k);
    requests(&mut s, &frame(&mut t, &msg(1, RequestBody::Ping, false)));
    let r = s.receive_data(&frame(&mut t, &msg(2, resume.clone(), false)));
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    // A MAC'd RESUME or END: protocol errors.
    for body in [resume.clone(), RequestBody::End] {
        let (mut t, mut s) = raw_pair(&k);
        let r = s.receive_data(&frame(&mut t, &msg(1, body, true)));
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    }
    // RESUME first is fine.
    let (mut t, mut s) = raw_pair(&k);
    let ev = requests(&mut s, &frame(&mut t, &msg(5, resume, false)));
    assert_eq!(ev.len(), 1);
    // After adopt: re-sends above last_req_id, never the RESUME's id again.
    s.adopt([9; 32], 3, 5).unwrap();
    assert_eq!(s.binding_id(), Some(&[9; 32]));
    requests(&mut s, &frame(&mut t, &msg(4, RequestBody::Ping, false)));
    let r = s.receive_data(&frame(&mut t, &msg(5, RequestBody::Ping, false)));
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
}

/// A responder session and the initiator's raw transport, so a test can send what
/// the client's encoder would never make.
fn raw_pair(k: &Keys) -> (Transport, ServerSession) {
    let mut ini = Initiator::new(&k.public).unwrap();
    let mut s = ServerSession::new(&k.private).unwrap();
    let mut hello = vec![VERSION, FrameKind::HELLO.wire()];
    hello.extend(ini.hello().unwrap());
    s.receive_data(&encode_frame(&hello).unwrap()).unwrap();
    let welcome = s.data_to_send();
    let (t, _) = ini.finish(&welcome[6..]).unwrap();
    (t, s)
}

fn frame(t: &mut Transport, msg: &[u8]) -> Vec<u8> {
    encode_frame(&t.encrypt(msg).unwrap()).unwrap()
}
