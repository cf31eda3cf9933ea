//! The client's switchless ring code driven over a pipe, for the interop tests under
//! `tests/native/` (the Rust ring against `esem.protocol.ring` on the same regions):
//! one JSON command per line, one JSON answer per line.
//!
//! `{"op": "read", "cap": C, "start": S, "region": HEX, "limit": N|null}` attaches the
//! client's ends (private counters at S) to a mapping holding the region's bytes and
//! reads the reply ring; `{"op": "write", ..., "data": HEX}` writes the request ring.
//! Answers: `{"ok": true, "data": HEX | "n": N, "region": HEX}` (the region after), or
//! `{"ok": false, "error": CLASS, "message": TEXT}`.

use esem_client::ring::{Rings, Shm};
use serde_json::{json, Value};
use std::io::{BufRead, Write};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd hex".into());
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn run(cmd: &Value) -> Result<Value, String> {
    let cap = cmd["cap"].as_u64().ok_or("cap")?;
    let start = cmd["start"].as_u64().ok_or("start")?;
    let region = unhex(cmd["region"].as_str().ok_or("region")?)?;
    let shm = Shm::anonymous(region.len()).map_err(|e| e.to_string())?;
    if !shm.write_at(0, &region) {
        return Err("region does not fit".into());
    }
    let mut rings = match Rings::attach_at(shm, cap, start) {
        Ok(r) => r,
        Err(e) => return Ok(json!({"ok": false, "error": e.class(), "message": e.to_string()})),
    };
    let out = match cmd["op"].as_str() {
        Some("read") => {
            let limit = cmd["limit"].as_u64().map_or(usize::MAX, |l| l as usize);
            rings.read(limit).map(|d| json!({"data": hex(&d)}))
        }
        Some("write") => {
            let data = unhex(cmd["data"].as_str().ok_or("data")?)?;
            rings.write(&data).map(|n| json!({"n": n}))
        }
        _ => return Err("unknown op".into()),
    };
    Ok(match out {
        Ok(mut v) => {
            let mut after = vec![0u8; region.len()];
            rings.shm().read_at(0, &mut after);
            v["ok"] = json!(true);
            v["region"] = json!(hex(&after));
            v
        }
        Err(e) => json!({"ok": false, "error": e.class(), "message": e.to_string()}),
    })
}

fn main() {
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(cmd) => {
                run(&cmd).unwrap_or_else(|e| json!({"ok": false, "error": "Bad", "message": e}))
            }
            Err(e) => json!({"ok": false, "error": "Bad", "message": e.to_string()}),
        };
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
}
