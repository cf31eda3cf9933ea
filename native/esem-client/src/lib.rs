//! The native esem client: a blocking, thread-safe, fork-safe session with the esem
//! service over its Unix socket, on top of the sans-I/O `esem-proto` crate, and the
//! e-semaphore operations of the Python API (`esem.api`) for Rust programs and for the
//! LD_PRELOAD library.

pub mod conn;
pub mod error;
pub mod paths;
pub mod resume;
pub mod ring;
pub mod sem;
mod sys;

pub use conn::{
    has_own_thread, process_client, set_reconnect_at_fork, spawning_own_thread, Client,
};
pub use error::{ClientError, Result};
pub use ring::Switchless;
pub use sem::{unlink, unlink_via, OpenOptions, Semaphore};
pub use sys::HIGH_FD;
