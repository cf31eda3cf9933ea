//! Strategies shared by the property tests and the fuzz test: every valid request and
//! reply of protocol version 1.
#![allow(dead_code)]

use esem_proto::consts::{open_flag, Opcode, Status, WaitMode, MAX_MESSAGE_BYTES, MAX_TIMEOUT_NS};
use esem_proto::msg::{Reply, ReplyBody, Request, RequestBody};
use proptest::prelude::*;

pub fn name() -> impl Strategy<Value = String> {
    // Any UTF-8 of 2..=252 bytes (the wire rule; the POSIX shape is the core's).
    prop_oneof![
        "/[a-zA-Z0-9._-]{1,40}",
        "[\\PC]{2,60}".prop_filter("wire length", |s| (2..=252).contains(&s.len())),
        Just(format!("/{}", "x".repeat(251))),
    ]
}

pub fn cursor() -> impl Strategy<Value = String> {
    // LIST's `after`: any UTF-8 of 0..=252 bytes, a position, not necessarily a name.
    prop_oneof![
        Just(String::new()),
        "/[a-zA-Z0-9._-]{0,40}",
        "[\\PC]{0,60}".prop_filter("wire length", |s| s.len() <= 252),
        Just(format!("/{}", "é".repeat(125))),
    ]
}

pub fn handle() -> impl Strategy<Value = [u8; 16]> {
    any::<[u8; 16]>()
}

pub fn key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        proptest::collection::vec(any::<u8>(), 16..=32).prop_map(Some)
    ]
}

pub fn wait() -> impl Strategy<Value = (WaitMode, u64)> {
    prop_oneof![
        Just((WaitMode::TRY, 0)),
        Just((WaitMode::BLOCK, 0)),
        (0..=MAX_TIMEOUT_NS).prop_map(|t| (WaitMode::TIMED, t)),
    ]
}

pub fn request_body() -> impl Strategy<Value = RequestBody> {
    prop_oneof![
        (
            0..=open_flag::KNOWN,
            any::<u16>(),
            any::<u32>(),
            key(),
            name()
        )
            .prop_map(|(oflag, mode, value, key, name)| RequestBody::Open {
                oflag,
                mode,
                value,
                key,
                name
            }),
        handle().prop_map(|handle| RequestBody::Close { handle }),
        name().prop_map(|name| RequestBody::Unlink { name }),
        (handle(), wait()).prop_map(|(handle, (mode, timeout_ns))| RequestBody::Wait {
            handle,
            mode,
            timeout_ns
        }),
        handle().prop_map(|handle| RequestBody::Post { handle }),
        handle().prop_map(|handle| RequestBody::GetValue { handle }),
        any::<u64>().prop_map(|target| RequestBody::Cancel { target }),
        handle().prop_map(|handle| RequestBody::Attach { handle }),
        cursor().prop_map(|after| RequestBody::List { after }),
        name().prop_map(|name| RequestBody::Stat { name }),
        Just(RequestBody::Ping),
        Just(RequestBody::Switchless),
        name().prop_map(|name| RequestBody::Reclaim { name }),
        (any::<[u8; 32]>(), any::<[u8; 32]>(), awaited()).prop_map(|(session, secret, awaited)| {
            RequestBody::Resume {
                session,
                secret,
                awaited,
            }
        }),
        Just(RequestBody::End),
    ]
}

/// RESUME's awaited ids: usually a few, sometimes more than RESUME_MAX_AWAITED (which
/// parses: the service answers EINVAL), up to what fits in one message.
pub fn awaited() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        8 => proptest::collection::vec(any::<u64>(), 0..40),
        1 => proptest::collection::vec(any::<u64>(), 1000..2030),
    ]
}

pub fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), request_body()).prop_map(|(req_id, body)| Request { req_id, body })
}

pub fn opcode() -> impl Strategy<Value = Opcode> {
    proptest::sample::select(Opcode::ALL)
}

pub fn reply() -> impl Strategy<Value = Reply> {
    let refusal = (
        opcode(),
        any::<u64>(),
        proptest::sample::select(&Status::ALL[1..]),
        proptest::collection::vec(any::<u8>(), 0..=MAX_MESSAGE_BYTES),
    )
        .prop_map(|(opcode, req_id, status, text)| Reply {
            opcode,
            req_id,
            status,
            body: ReplyBody::Refusal(text),
        });
    let ok = (
        opcode(),
        any::<u64>(),
        handle(),
        any::<bool>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..200),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(opcode, req_id, handle, created, value, json, sem_id, last)| {
                let body = match opcode {
                    Opcode::OPEN | Opcode::ATTACH => ReplyBody::Handle {
                        handle,
                        created,
                        sem_id,
                    },
                    Opcode::GETVALUE | Opcode::CANCEL | Opcode::SWITCHLESS | Opcode::RECLAIM => {
                        ReplyBody::Value(value)
                    }
                    Opcode::LIST | Opcode::STAT => ReplyBody::Json(json),
                    Opcode::RESUME => ReplyBody::LastReqId(last),
                    _ => ReplyBody::Empty,
                };
                Reply {
                    opcode,
                    req_id,
                    status: Status::OK,
                    body,
                }
            },
        );
    prop_oneof![refusal, ok]
}
