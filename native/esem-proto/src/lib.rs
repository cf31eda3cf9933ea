//! esem protocol version 1, sans-I/O: framing, messages, the Noise NK handshake and
//! transport (through `snow`), key-binding MACs, the client session state machine and
//! the switchless ring index rules. PROTOCOL.md in the repository is the contract; the
//! Python package (`esem.protocol`) is the reference implementation, and the tests
//! under `tests/native/` check that both agree byte for byte.
//!
//! No I/O, no threads, no clock, no `unsafe`: everything a peer sends is parsed here,
//! and every parser returns a value or a protocol error, never panics (fuzzed).
#![forbid(unsafe_code)]

pub mod consts;
pub mod crypto;
pub mod error;
pub mod frame;
pub mod msg;
pub mod ring;
pub mod session;

pub use consts::{Direction, FrameKind, Opcode, Status, WaitMode};
pub use error::{Error, Result};
pub use msg::{Handle, Reply, ReplyBody, Request, RequestBody};
pub use session::{ClientSession, ServerSession, State};
