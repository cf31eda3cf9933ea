//! Interop driver for `tests/native/` (pytest): reads one JSON command per line on
//! stdin, answers one JSON object per line on stdout, holding handshake and session
//! state between lines, so the Python tests can run the same vectors and the same
//! handshakes through both implementations and compare every byte.
//!
//! Errors are answered as `{"ok": false, "class": "ProtocolError"|"IntegrityError"|
//! "Refused"|"Misuse", "message": ..., "status": ...}`.

use esem_proto::consts::*;
use esem_proto::crypto::{keybind_mac, Initiator, Responder, Transport};
use esem_proto::frame::FrameDecoder;
use esem_proto::msg::*;
use esem_proto::session::ClientSession;
use esem_proto::{Error, Result};
use serde_json::{json, Map, Value};
use std::io::{BufRead, Write};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(Error::Misuse("odd hex".into()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| Error::Misuse("bad hex".into())))
        .collect()
}

fn field<'a>(v: &'a Value, k: &str) -> Result<&'a Value> {
    v.get(k)
        .ok_or_else(|| Error::Misuse(format!("missing {k}")))
}

fn s<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    field(v, k)?
        .as_str()
        .ok_or_else(|| Error::Misuse(format!("{k} not a string")))
}

fn u(v: &Value, k: &str) -> Result<u64> {
    v.get(k).map_or(Ok(0), |x| {
        x.as_u64()
            .ok_or_else(|| Error::Misuse(format!("{k} not u64")))
    })
}

fn bytes(v: &Value, k: &str) -> Result<Vec<u8>> {
    unhex(s(v, k)?)
}

fn array32(v: &Value, k: &str) -> Result<[u8; 32]> {
    bytes(v, k)?
        .try_into()
        .map_err(|_| Error::Misuse(format!("{k} not 32 bytes")))
}

fn handle(v: &Value) -> Result<Handle> {
    bytes(v, "handle")?
        .try_into()
        .map_err(|_| Error::Misuse("handle not 16 bytes".into()))
}

fn request_from_json(v: &Value) -> Result<Request> {
    let op = s(v, "opcode")?;
    let name = || s(v, "name").map(str::to_owned);
    let body = match op {
        "OPEN" => RequestBody::Open {
            oflag: u(v, "oflag")? as u8,
            mode: u(v, "mode")? as u16,
            value: u(v, "value")? as u32,
            key: match v.get("key") {
                Some(Value::String(k)) => Some(unhex(k)?),
                _ => None,
            },
            name: name()?,
        },
        "CLOSE" => RequestBody::Close { handle: handle(v)? },
        "UNLINK" => RequestBody::Unlink { name: name()? },
        "WAIT" => RequestBody::Wait {
            handle: handle(v)?,
            mode: WaitMode::ALL
                .iter()
                .copied()
                .find(|m| m.name() == s(v, "wait_mode").unwrap_or("BLOCK"))
                .ok_or_else(|| Error::Misuse("wait_mode".into()))?,
            timeout_ns: u(v, "timeout_ns")?,
        },
        "POST" => RequestBody::Post { handle: handle(v)? },
        "GETVALUE" => RequestBody::GetValue { handle: handle(v)? },
        "CANCEL" => RequestBody::Cancel {
            target: u(v, "target")?,
        },
        "ATTACH" => RequestBody::Attach { handle: handle(v)? },
        "LIST" => RequestBody::List {
            after: s(v, "after")?.to_owned(),
        },
        "STAT" => RequestBody::Stat { name: name()? },
        "RECLAIM" => RequestBody::Reclaim { name: name()? },
        "PING" => RequestBody::Ping,
        "SWITCHLESS" => RequestBody::Switchless,
        "RESUME" => RequestBody::Resume {
            session: array32(v, "session")?,
            secret: array32(v, "secret")?,
            awaited: field(v, "awaited")?
                .as_array()
                .ok_or_else(|| Error::Misuse("awaited not a list".into()))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .ok_or_else(|| Error::Misuse("awaited id not u64".into()))
                })
                .collect::<Result<Vec<u64>>>()?,
        },
        "END" => RequestBody::End,
        other => return Err(Error::Misuse(format!("opcode {other}"))),
    };
    Ok(Request {
        req_id: u(v, "req_id")?,
        body,
    })
}

/// The request as the Python dataclass's fields (defaults for the unused ones).
fn request_to_json(r: &Request) -> Value {
    let mut m = Map::new();
    m.insert("opcode".into(), json!(r.body.opcode().name()));
    m.insert("req_id".into(), json!(r.req_id));
    let d = json!({"handle": "", "name": "", "oflag": 0, "mode": 0, "value": 0, "key": null,
                   "wait_mode": "BLOCK", "timeout_ns": 0, "target": 0, "after": "",
                   "session": "", "secret": "", "awaited": []});
    for (k, v) in d.as_object().into_iter().flatten() {
        m.insert(k.clone(), v.clone());
    }
    let mut set = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    match &r.body {
        RequestBody::Open {
            oflag,
            mode,
            value,
            key,
            name,
        } => {
            set("oflag", json!(oflag));
            set("mode", json!(mode));
            set("value", json!(value));
            set("key", key.as_ref().map_or(Value::Null, |k| json!(hex(k))));
            set("name", json!(name));
        }
        RequestBody::Wait {
            handle,
            mode,
            timeout_ns,
        } => {
            set("handle", json!(hex(handle)));
            set("wait_mode", json!(mode.name()));
            set("timeout_ns", json!(timeout_ns));
        }
        RequestBody::Close { handle }
        | RequestBody::Post { handle }
        | RequestBody::GetValue { handle }
        | RequestBody::Attach { handle } => set("handle", json!(hex(handle))),
        RequestBody::Unlink { name }
        | RequestBody::Stat { name }
        | RequestBody::Reclaim { name } => set("name", json!(name)),
        RequestBody::Cancel { target } => set("target", json!(target)),
        RequestBody::List { after } => set("after", json!(after)),
        RequestBody::Resume {
            session,
            secret,
            awaited,
        } => {
            set("session", json!(hex(session)));
            set("secret", json!(hex(secret)));
            set("awaited", json!(awaited));
        }
        RequestBody::Ping | RequestBody::Switchless | RequestBody::End => {}
    }
    Value::Object(m)
}

fn reply_from_json(v: &Value) -> Result<Reply> {
    let opcode = Opcode::ALL
        .iter()
        .copied()
        .find(|o| o.name() == s(v, "opcode").unwrap_or(""))
        .ok_or_else(|| Error::Misuse("opcode".into()))?;
    let status = Status::ALL
        .iter()
        .copied()
        .find(|o| o.name() == s(v, "status").unwrap_or(""))
        .ok_or_else(|| Error::Misuse("status".into()))?;
    let body = if status != Status::OK {
        ReplyBody::Refusal(bytes(v, "message_raw")?)
    } else {
        match opcode {
            Opcode::OPEN | Opcode::ATTACH => ReplyBody::Handle {
                handle: handle(v)?,
                created: field(v, "created")?.as_bool().unwrap_or(false),
                sem_id: u(v, "sem_id")?,
            },
            Opcode::GETVALUE | Opcode::CANCEL | Opcode::SWITCHLESS | Opcode::RECLAIM => {
                ReplyBody::Value(u(v, "value")? as u32)
            }
            Opcode::LIST | Opcode::STAT => ReplyBody::Json(bytes(v, "data")?),
            Opcode::RESUME => ReplyBody::LastReqId(u(v, "value")?),
            _ => ReplyBody::Empty,
        }
    };
    Ok(Reply {
        opcode,
        req_id: u(v, "req_id")?,
        status,
        body,
    })
}

fn reply_to_json(r: &Reply) -> Value {
    let (handle, created, sem_id, value, data) = match &r.body {
        ReplyBody::Handle {
            handle,
            created,
            sem_id,
        } => (hex(handle), *created, *sem_id, 0, String::new()),
        ReplyBody::Value(v) => (String::new(), false, 0, u64::from(*v), String::new()),
        ReplyBody::LastReqId(v) => (String::new(), false, 0, *v, String::new()),
        ReplyBody::Json(d) => (String::new(), false, 0, 0, hex(d)),
        _ => (String::new(), false, 0, 0, String::new()),
    };
    json!({"opcode": r.opcode.name(), "req_id": r.req_id, "status": r.status.name(),
           "handle": handle, "created": created, "sem_id": sem_id, "value": value,
           "data": data, "message": r.message()})
}

fn err_json(e: &Error) -> Value {
    let status = match e {
        Error::Refused { status, .. } => json!(status.name()),
        _ => Value::Null,
    };
    json!({"ok": false, "class": e.class(), "message": e.to_string(), "status": status})
}

#[derive(Default)]
struct Tool {
    initiator: Option<Initiator>,
    responder: Option<Responder>,
    transport: Option<Transport>,
    client: Option<ClientSession>,
    /// The new connection's session while `client` reconnects (`client_reconnect`).
    fresh: Option<ClientSession>,
}

impl Tool {
    fn run(&mut self, v: &Value) -> Result<Value> {
        match s(v, "op")? {
            "decode_request" => {
                let d = decode_request(&bytes(v, "hex")?)?;
                let mut re = encode_request(&d.message, d.mac.is_some())?;
                re.extend_from_slice(d.mac.as_ref().map_or(&[][..], |m| &m[..]));
                Ok(json!({"ok": true, "request": request_to_json(&d.message),
                          "mac": d.mac.map(|m| hex(&m)), "signed": hex(&d.signed),
                          "reencoded": hex(&re)}))
            }
            "decode_reply" => {
                let d = decode_reply(&bytes(v, "hex")?)?;
                let mut re = encode_reply(&d.message, d.mac.is_some())?;
                re.extend_from_slice(d.mac.as_ref().map_or(&[][..], |m| &m[..]));
                Ok(json!({"ok": true, "reply": reply_to_json(&d.message),
                          "mac": d.mac.map(|m| hex(&m)), "signed": hex(&d.signed),
                          "reencoded": hex(&re)}))
            }
            "encode_request" => {
                let req = request_from_json(field(v, "request")?)?;
                let mac = v.get("mac").and_then(Value::as_bool).unwrap_or(false);
                Ok(json!({"ok": true, "hex": hex(&encode_request(&req, mac)?)}))
            }
            "encode_reply" => {
                let rep = reply_from_json(field(v, "reply")?)?;
                let mac = v.get("mac").and_then(Value::as_bool).unwrap_or(false);
                Ok(json!({"ok": true, "hex": hex(&encode_reply(&rep, mac)?)}))
            }
            "frames" => {
                let data = bytes(v, "hex")?;
                let chunk = (u(v, "chunk")? as usize).max(1);
                let mut d = FrameDecoder::new();
                let mut out = Vec::new();
                for c in data.chunks(chunk) {
                    out.extend(d.feed(c)?.iter().map(|f| hex(f)));
                }
                Ok(json!({"ok": true, "frames": out, "buffered": d.buffered()}))
            }
            "mac" => {
                let sid: [u8; 32] = bytes(v, "session_id")?
                    .try_into()
                    .map_err(|_| Error::Misuse("session id".into()))?;
                let dir = Direction::from_wire(u(v, "direction")? as u8)
                    .ok_or_else(|| Error::Misuse("direction".into()))?;
                let mac = keybind_mac(&bytes(v, "key")?, &sid, dir, &bytes(v, "message")?)?;
                Ok(json!({"ok": true, "mac": hex(&mac)}))
            }
            "initiator" => {
                let public = bytes(v, "public")?;
                let mut ini = match v.get("ephemeral") {
                    Some(Value::String(e)) => {
                        Initiator::new_with_fixed_ephemeral_for_testing(&public, &unhex(e)?)?
                    }
                    _ => Initiator::new(&public)?,
                };
                let hello = ini.hello()?;
                self.initiator = Some(ini);
                Ok(json!({"ok": true, "hello": hex(&hello)}))
            }
            "finish" => {
                let ini = self
                    .initiator
                    .take()
                    .ok_or_else(|| Error::Misuse("no initiator".into()))?;
                let (t, secret) = ini.finish(&bytes(v, "welcome")?)?;
                let sid = hex(t.session_id());
                self.transport = Some(t);
                Ok(json!({"ok": true, "session_id": sid, "secret": hex(&secret)}))
            }
            "responder" => {
                self.responder = Some(Responder::new(&bytes(v, "private")?)?);
                Ok(json!({"ok": true}))
            }
            "respond" => {
                let r = self
                    .responder
                    .take()
                    .ok_or_else(|| Error::Misuse("no responder".into()))?;
                let (welcome, t) = r.respond(&bytes(v, "hello")?, &array32(v, "secret")?)?;
                let sid = hex(t.session_id());
                self.transport = Some(t);
                Ok(json!({"ok": true, "welcome": hex(&welcome), "session_id": sid}))
            }
            "encrypt" | "decrypt" => {
                let t = self
                    .transport
                    .as_mut()
                    .ok_or_else(|| Error::Misuse("no transport".into()))?;
                let data = bytes(v, "hex")?;
                let out = if s(v, "op")? == "encrypt" {
                    t.encrypt(&data)?
                } else {
                    t.decrypt(&data)?
                };
                Ok(json!({"ok": true, "hex": hex(&out)}))
            }
            "client_new" => {
                let public = bytes(v, "public")?;
                let ini = match v.get("ephemeral") {
                    Some(Value::String(e)) => {
                        Initiator::new_with_fixed_ephemeral_for_testing(&public, &unhex(e)?)?
                    }
                    _ => Initiator::new(&public)?,
                };
                let mut c = ClientSession::with_initiator(ini);
                let hello = c.start()?;
                self.client = Some(c);
                Ok(json!({"ok": true, "hex": hex(&hello)}))
            }
            "client_send" => {
                let c = self
                    .client
                    .as_mut()
                    .ok_or_else(|| Error::Misuse("no client".into()))?;
                let req = request_from_json(field(v, "request")?)?;
                let key = match v.get("key") {
                    Some(Value::String(k)) => Some(unhex(k)?),
                    _ => None,
                };
                let (id, frame) = c.send_request(&req.body, key.as_deref())?;
                Ok(json!({"ok": true, "req_id": id, "hex": hex(&frame)}))
            }
            "client_detach" => {
                let c = self
                    .client
                    .as_mut()
                    .ok_or_else(|| Error::Misuse("no client".into()))?;
                c.detach()?;
                Ok(json!({"ok": true}))
            }
            "client_reconnect" => {
                let ini = Initiator::new(&bytes(v, "public")?)?;
                let mut fresh = ClientSession::with_initiator(ini);
                let hello = fresh.start()?;
                self.fresh = Some(fresh);
                Ok(json!({"ok": true, "hex": hex(&hello)}))
            }
            // While reconnecting: the WELCOME goes to the new connection's session, and
            // once it is established the detached session RESUMEs over it.
            "client_receive" if self.fresh.is_some() => {
                let mut fresh = self.fresh.take().expect("checked");
                fresh.receive_data(&bytes(v, "hex")?)?;
                let c = self
                    .client
                    .as_mut()
                    .ok_or_else(|| Error::Misuse("no client".into()))?;
                c.resume_over(fresh)?;
                Ok(json!({"ok": true, "replies": [], "outgoing": hex(&c.take_outgoing())}))
            }
            "client_receive" => {
                let c = self
                    .client
                    .as_mut()
                    .ok_or_else(|| Error::Misuse("no client".into()))?;
                let replies = c.receive_data(&bytes(v, "hex")?)?;
                let sid = c.session_id().map(|s| hex(s));
                let secret = c.resume_secret().map(|s| hex(s));
                let outgoing = hex(&c.take_outgoing());
                Ok(
                    json!({"ok": true, "replies": replies.iter().map(reply_to_json).collect::<Vec<_>>(),
                          "session_id": sid, "secret": secret, "outgoing": outgoing}),
                )
            }
            other => Err(Error::Misuse(format!("unknown op {other}"))),
        }
    }
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut tool = Tool::default();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(v) => tool.run(&v).unwrap_or_else(|e| err_json(&e)),
            Err(e) => err_json(&Error::Misuse(format!("bad JSON: {e}"))),
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}
