//! A line-driven driver of the native client for the tests under `tests/native/`: one
//! command per line on stdin, one answer line on stdout (`ok ...` or
//! `err CLASS STATUS message`). It holds one current semaphore.
//!
//! Commands: `open NAME FLAGS VALUE MODE [KEYHEX]` (FLAGS: any of c x r, or -),
//! `wait`, `trywait`, `timedwait MS`, `post`, `value`, `close`, `unlink NAME [KEYHEX]`,
//! `fork-post` (a fork child posts through the inherited handle, which ATTACHes),
//! `fd` (the session descriptor), `clobber-fd` (put a socket of the program's at that
//! number) and `peer` (bytes that reached that socket), `sid`, `ping`, `mode` (the
//! transport, socket or switchless, and the switchless region's descriptor),
//! `hold-and-close NAME` (a second session takes a unit of a new robust NAME, then is
//! closed).

use esem_client::Client;
use esem_client::{conn, process_client, unlink, ClientError, OpenOptions, Semaphore};
use esem_proto::{ReplyBody, RequestBody, WaitMode};
use std::io::{BufRead, Write};
use std::time::Duration;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

fn answer(r: Result<String, ClientError>) -> String {
    match r {
        Ok(s) => format!("ok {s}"),
        Err(e) => {
            let class = match &e {
                ClientError::Status { .. } => "Status",
                ClientError::Channel(pe) if pe.is_integrity() => "Integrity",
                ClientError::Channel(_) => "Refused",
                ClientError::Unavailable(_) => "Unavailable",
                ClientError::Interrupted => "Interrupted",
                ClientError::Invalid(_) => "Invalid",
            };
            let status = e.status().map_or("-", |s| s.name());
            format!("err {class} {status} {}", e.to_string().replace('\n', " "))
        }
    }
}

fn main() {
    let mut sem: Option<Semaphore> = None;
    let mut peer: i32 = -1;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.is_empty() {
            continue;
        }
        let cur = || {
            sem.as_ref()
                .ok_or_else(|| ClientError::Invalid("no semaphore open".into()))
        };
        let r: Result<String, ClientError> = match w[0] {
            "open" if w.len() >= 5 => {
                let opts = OpenOptions {
                    create: w[2].contains('c'),
                    exclusive: w[2].contains('x'),
                    robust: w[2].contains('r'),
                    value: w[3].parse().unwrap_or(0),
                    mode: u32::from_str_radix(w[4], 8).unwrap_or(0o600),
                    key: w.get(5).map(|k| unhex(k)),
                };
                Semaphore::open(w[1], &opts).map(|s| {
                    let c = s.created();
                    sem = Some(s);
                    format!("created={}", u8::from(c))
                })
            }
            "wait" => cur().and_then(|s| s.wait()).map(|_| String::new()),
            "trywait" => cur().and_then(|s| s.try_wait()).map(|_| String::new()),
            "timedwait" if w.len() == 2 => cur()
                .and_then(|s| s.timed_wait(Duration::from_millis(w[1].parse().unwrap_or(0))))
                .map(|_| String::new()),
            "post" => cur().and_then(|s| s.post()).map(|_| String::new()),
            "value" => cur().and_then(|s| s.value()).map(|v| v.to_string()),
            "close" => cur().and_then(|s| s.close()).map(|_| String::new()),
            "unlink" if w.len() >= 2 => {
                let key = w.get(2).map(|k| unhex(k));
                unlink(w[1], key.as_deref()).map(|_| String::new())
            }
            "fork-post" => cur().map(|s| {
                let pid = fork();
                if pid == 0 {
                    let code = match s.post() {
                        Ok(()) => 0,
                        Err(e) => {
                            eprintln!("child: {e}");
                            1
                        }
                    };
                    std::process::exit(code);
                }
                format!("child={}", wait_child(pid))
            }),
            "fd" => process_client().map(|c| conn::session_fd(c).to_string()),
            // The program puts a socket of its own at the session's descriptor number
            // (a file would be refused by send(2) anyway); `peer` counts what reached it.
            "clobber-fd" => process_client().map(|c| {
                let fd = conn::session_fd(c);
                let mut pair = [0i32; 2];
                // SAFETY: makes a socket pair and moves one end onto a descriptor number,
                // as a careless program might; the client must notice.
                unsafe {
                    libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr());
                    libc::dup2(pair[0], fd);
                    libc::close(pair[0]);
                }
                peer = pair[1];
                fd.to_string()
            }),
            "peer" => {
                let mut buf = [0u8; 65536];
                // SAFETY: a non-blocking read into a live buffer from our own socket.
                let n = unsafe {
                    libc::recv(peer, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
                };
                Ok(n.max(0).to_string())
            }
            "sid" => process_client().map(|c| {
                c.session_id().map_or(String::new(), |s| {
                    s.iter().map(|b| format!("{b:02x}")).collect()
                })
            }),
            // The session's transport and its switchless region's descriptor (-1: none).
            "mode" => {
                process_client().map(|c| format!("{} {}", c.mode(), c.ring_memfd().unwrap_or(-1)))
            }
            // A second session of this process takes a unit of a new robust NAME and
            // is closed (dropped) at once: its close sends END, so the service ends it
            // (releasing the unit) without a grace period.
            "hold-and-close" if w.len() == 2 => hold_and_close(w[1]),
            "ping" => process_client()
                .and_then(|c| c.call(&RequestBody::Ping, None))
                .map(|_| String::new()),
            _ => Err(ClientError::Invalid(format!("unknown command {line:?}"))),
        };
        let _ = writeln!(out, "{}", answer(r));
        let _ = out.flush();
    }
}

fn hold_and_close(name: &str) -> Result<String, ClientError> {
    let c = Client::connect()?;
    let open = RequestBody::Open {
        oflag: esem_proto::consts::open_flag::CREAT | esem_proto::consts::open_flag::ROBUST,
        mode: 0o600,
        value: 1,
        key: None,
        name: name.to_owned(),
    };
    let ReplyBody::Handle { handle, .. } = c.call(&open, None)?.body else {
        return Err(ClientError::Invalid("OPEN without a handle".into()));
    };
    let take = RequestBody::Wait {
        handle,
        mode: WaitMode::TRY,
        timeout_ns: 0,
    };
    c.call(&take, None)?;
    drop(c);
    Ok(String::new())
}

fn fork() -> i32 {
    // SAFETY: the child runs only the client's code path and exits.
    unsafe { libc::fork() }
}

fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live i32.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WEXITSTATUS(status)
}
