//! The client's errors: a refused operation (a status, as the Python client raises
//! `error_for(status)`), a broken channel (`Integrity`/`Protocol`: tampering; the
//! session is dead), an unavailable service, an interrupted wait, and misuse.

use esem_proto::{Error as ProtoError, Status};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The service refused the operation; nothing changed.
    Status { status: Status, message: String },
    /// The channel failed authentication or broke the protocol (closes the session),
    /// or the service refused the session at the handshake (`ProtoError::Refused`).
    Channel(ProtoError),
    /// No service, the service went away, or it stopped answering (keepalive).
    Unavailable(String),
    /// A signal interrupted a wait (only for interruptible waits); no unit was taken.
    Interrupted,
    /// Bad arguments; nothing was sent.
    Invalid(String),
}

impl ClientError {
    /// The errno a C caller should see.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Status { status, .. } => status.errno(),
            ClientError::Channel(e) => e.errno(),
            ClientError::Unavailable(_) => libc::EIO,
            ClientError::Interrupted => libc::EINTR,
            ClientError::Invalid(_) => libc::EINVAL,
        }
    }

    /// The refusal status, if this is one.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            ClientError::Channel(ProtoError::Refused { status, .. }) => Some(*status),
            _ => None,
        }
    }

    /// True if the channel failed authentication or broke the protocol.
    pub fn is_integrity(&self) -> bool {
        matches!(self, ClientError::Channel(e) if e.is_integrity())
    }
}

impl From<ProtoError> for ClientError {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Misuse(m) => ClientError::Invalid(m),
            // A session the service would not resume: its handles are gone.
            ProtoError::Lost(m) => ClientError::Unavailable(m),
            other => ClientError::Channel(other),
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Status { status, message } => write!(f, "{}: {message}", status.name()),
            ClientError::Channel(e) => write!(f, "{e}"),
            ClientError::Unavailable(m) => write!(f, "esem service unavailable: {m}"),
            ClientError::Interrupted => write!(f, "interrupted by a signal"),
            ClientError::Invalid(m) => write!(f, "invalid argument: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

pub type Result<T> = std::result::Result<T, ClientError>;
