//! One error type for the crate, split exactly as the Python reference splits it:
//! `Protocol` (Python `ProtocolError`: the peer sent something that is not the protocol)
//! is a kind of `Integrity` failure (Python `IntegrityError`: authentication failed);
//! `Refused` is a service's REFUSED frame, mapped to its status; `Misuse` is the
//! caller's mistake (Python `ValueError`/`RuntimeError`) and is raised before anything
//! is encrypted or sent; `Lost` (Python `ServiceUnavailable`) is a session the service
//! would not resume (PROTOCOL.md 16). Every `Protocol` or `Integrity` error closes the
//! session, and such a session is never resumed.

use crate::consts::Status;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The peer's bytes are not protocol version 1 (framing, fields, matching).
    Protocol(String),
    /// Authentication failed: a frame, the handshake or a key-binding MAC.
    Integrity(String),
    /// The service refused the session at the handshake (never `Status::OK`).
    Refused { status: Status, text: String },
    /// The caller asked for something invalid; nothing was sent.
    Misuse(String),
    /// The service refused to resume the session (unknown, ended, grace expired, or
    /// not ours): its handles are gone. Not an integrity failure.
    Lost(String),
}

impl Error {
    pub(crate) fn protocol(msg: impl Into<String>) -> Self {
        Error::Protocol(msg.into())
    }
    pub(crate) fn integrity(msg: impl Into<String>) -> Self {
        Error::Integrity(msg.into())
    }
    pub(crate) fn misuse(msg: impl Into<String>) -> Self {
        Error::Misuse(msg.into())
    }

    /// True for `Protocol` and `Integrity`: what Python raises as `IntegrityError`.
    pub fn is_integrity(&self) -> bool {
        matches!(self, Error::Protocol(_) | Error::Integrity(_))
    }

    /// The class name of the Python exception this corresponds to.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Protocol(_) => "ProtocolError",
            Error::Integrity(_) => "IntegrityError",
            Error::Refused { .. } => "Refused",
            Error::Misuse(_) => "Misuse",
            Error::Lost(_) => "ServiceUnavailable",
        }
    }

    /// The errno a C caller should see for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            // EPROTO: the channel is not to be trusted any more.
            Error::Protocol(_) | Error::Integrity(_) => 71,
            Error::Refused { status, .. } => status.errno(),
            Error::Misuse(_) => 22,
            Error::Lost(_) => 5, // EIO, as for any unavailable service
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Integrity(m) => write!(f, "integrity error: {m}"),
            Error::Refused { status, text } => {
                write!(f, "service refused the session ({}): {text}", status.name())
            }
            Error::Misuse(m) => write!(f, "invalid use: {m}"),
            Error::Lost(m) => write!(f, "session lost: {m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
