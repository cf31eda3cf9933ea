//! Session resumption policy (PROTOCOL.md 16), the part of it that is not wire: which
//! failures are a lost connection worth reconnecting for, how long and how often to
//! try, and the pinned key's re-check. The reconnection itself is the reader thread's
//! (`conn.rs`), the RESUME exchange is the sans-I/O session's (`esem-proto`).
//!
//! Only a lost connection (EOF, ECONNRESET, EPIPE; ENOENT/ECONNREFUSED while
//! reconnecting) is retried: an integrity or protocol error, a refusal, a changed key
//! or a replaced descriptor ends the session as before, and a fork child never resumes
//! its parent's session (the fork handler has already let go of it).

use crate::error::ClientError;
use crate::paths;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// `ESEM_RESUME_TIMEOUT` when unset: how long a client keeps reconnecting.
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause between reconnection attempts (doubling in between).
pub const BACKOFF_FIRST: Duration = Duration::from_millis(5);
pub const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// How long to keep reconnecting after a lost connection: `ESEM_RESUME_TIMEOUT`
/// (seconds, fractions allowed; 0 turns resumption off), else 10 s. A value that does
/// not parse is the default rather than "off": a typo must not silently remove crash
/// safety. Read when a client connects, in the caller's thread.
pub fn resume_timeout() -> Option<Duration> {
    let Ok(raw) = std::env::var("ESEM_RESUME_TIMEOUT") else {
        return Some(DEFAULT_RESUME_TIMEOUT);
    };
    match raw.trim().parse::<f64>() {
        Ok(0.0) => None,
        Ok(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s.min(86_400.0))),
        _ => Some(DEFAULT_RESUME_TIMEOUT),
    }
}

/// Whether an I/O error on the session's socket means the connection is gone (the
/// service exited, crashed or restarted), as opposed to a local fault.
pub fn is_connection_loss(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// The pauses between attempts: 5 ms doubling to 200 ms, never past the deadline.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    deadline: Instant,
}

impl Backoff {
    pub fn new(timeout: Duration) -> Self {
        Backoff {
            next: BACKOFF_FIRST,
            deadline: Instant::now() + timeout,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Sleep before the next attempt; false once the deadline has passed.
    pub fn pause(&mut self) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(self.next.min(left));
        self.next = (self.next * 2).min(BACKOFF_MAX);
        true
    }
}

/// Where the pinned key came from, to re-read it as at the first connect.
#[derive(Clone, Copy, Debug)]
pub enum KeySource {
    /// The published key file beside the socket (`paths::read_published_key`).
    Published { default_location: bool },
    /// Given by the program (`Client::connect_to`) or by `ESEM_PUBKEY`: nothing to
    /// re-read (the environment is read once, at connect, never by the reader thread).
    Given,
}

/// Re-check the pinned key before reconnecting: `Ok` if it is still `pinned`, a retry
/// (`Err(None)`) if it cannot be read now (a restarting service may not have published
/// it yet), and a final integrity failure if it changed: a different key is never
/// accepted for a session made with another.
pub fn recheck_key(
    sock: &Path,
    source: KeySource,
    pinned: &[u8; 32],
) -> Result<(), Option<ClientError>> {
    let KeySource::Published { default_location } = source else {
        return Ok(());
    };
    match paths::read_published_key(sock, default_location) {
        Ok(k) if &k == pinned => Ok(()),
        Ok(_) => Err(Some(ClientError::Channel(esem_proto::Error::Integrity(
            format!(
                "the service at {} now publishes another key; the session is not resumed",
                sock.display()
            ),
        )))),
        Err(_) => Err(None),
    }
}
