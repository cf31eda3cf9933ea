//! `esem._native_core`: the native client (`esem-client`) under the Python API.
//!
//! A `Session` is one authenticated session with the service, owned by one Python
//! `esem.Client` (which keeps its fork guard, its failure, its statistics): the Python
//! object decides when to connect, close or let go after fork, this crate does the
//! frames, the AEAD, the MACs and the blocking, with the GIL released. Its reader
//! thread hands each reply to the waiting thread, so a blocked waiter never delays
//! another thread's post.
//!
//! Signals: a wait sleeps in `poll` on its thread's eventfd, which a signal interrupts;
//! the Python handlers then run (`check_signals`). If one raises, a WAIT is withdrawn
//! exactly as the Python client does (CANCEL, and a unit granted at that instant is
//! posted back) and the handler's exception is raised; `esem.api` turns an `Exception`
//! into `SignalError`. A bare reply wait (`wait_reply`) leaves the request pending.
//!
//! Switchless: a session opened with `switchless=1` (prefer) or `2` (require) upgrades to
//! the native client's rings (`esem_client::ring`), so a post from Python is one call
//! here that writes the request ring and spins on the reply ring, the GIL released; a
//! resumed session upgrades again by itself. A refused upgrade is `K_SWITCHLESS`
//! (required) or a warning on Python's `esem.client` logger (preferred), as the Python
//! client does.
//!
//! Errors become Python exceptions through one factory that `esem.client.native`
//! registers (`set_error_factory`), so the mapping onto `esem.errors` lives in Python.
//! Every argument from Python is checked here (lengths, wire ranges), so bad input is a
//! `ValueError`, never a panic.

mod ring_server;
mod server;

use esem_client::ring::{self, Switchless};
use esem_client::{Client, ClientError};
use esem_proto::consts::HANDLE_BYTES;
use esem_proto::{
    Error as ProtoError, Handle, Opcode, Reply, ReplyBody, RequestBody, Status, WaitMode,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyBytes;
use std::cell::RefCell;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The factory `(kind, status, message) -> exception` registered by Python.
static FACTORY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

// Kinds passed to the factory.
const K_STATUS: u8 = 0;
const K_PROTOCOL: u8 = 1;
const K_INTEGRITY: u8 = 2;
const K_UNAVAILABLE: u8 = 3;
const K_INVALID: u8 = 4;
const K_INTERRUPTED: u8 = 5;
const K_SWITCHLESS: u8 = 6;

fn kind_of(e: &ClientError) -> (u8, u16, String) {
    match e {
        ClientError::Status { status, message } => (K_STATUS, status.wire(), message.clone()),
        ClientError::Channel(ProtoError::Protocol(m)) => (K_PROTOCOL, 0, m.clone()),
        ClientError::Channel(ProtoError::Integrity(m)) => (K_INTEGRITY, 0, m.clone()),
        ClientError::Channel(ProtoError::Refused { status, text }) => (
            K_STATUS,
            status.wire(),
            format!("service refused the session: {text}"),
        ),
        ClientError::Channel(ProtoError::Misuse(m)) | ClientError::Invalid(m) => {
            (K_INVALID, 0, m.clone())
        }
        ClientError::Unavailable(m) if m.starts_with(ring::REFUSED) => (K_SWITCHLESS, 0, m.clone()),
        ClientError::Unavailable(m) | ClientError::Channel(ProtoError::Lost(m)) => {
            (K_UNAVAILABLE, 0, m.clone())
        }
        ClientError::Interrupted => (K_INTERRUPTED, 0, "interrupted by a signal".into()),
    }
}

/// The Python exception for `e` (from the registered factory).
fn exception<'py>(py: Python<'py>, e: &ClientError) -> PyResult<Bound<'py, PyAny>> {
    let (kind, status, message) = kind_of(e);
    let Some(factory) = FACTORY.get(py) else {
        return Err(PyRuntimeError::new_err(format!(
            "esem._native_core: no error factory registered ({e})"
        )));
    };
    factory.bind(py).call1((kind, status, message))
}

fn to_py(py: Python<'_>, e: &ClientError) -> PyErr {
    match exception(py, e) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// The refusal of a reply that is not OK, as `Client::call` makes it.
fn refusal(reply: &Reply) -> ClientError {
    ClientError::Status {
        status: reply.status,
        message: reply.message(),
    }
}

fn handle_arg(handle: &[u8]) -> PyResult<Handle> {
    Handle::try_from(handle).map_err(|_| {
        PyValueError::new_err(format!(
            "a handle token has {HANDLE_BYTES} bytes, not {}",
            handle.len()
        ))
    })
}

fn wire<T: TryFrom<u64>>(what: &str, v: u64) -> PyResult<T> {
    T::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} {v} out of range")))
}

/// Register the function that turns `(kind, status, message)` into an exception.
#[pyfunction]
fn set_error_factory(py: Python<'_>, factory: Py<PyAny>) -> PyResult<()> {
    FACTORY
        .set(py, factory)
        .map_err(|_| PyRuntimeError::new_err("the error factory is already registered"))
}

/// One session with the service. Thread-safe; every blocking call releases the GIL.
#[pyclass(frozen, module = "esem._native_core")]
struct Session {
    /// `None` once closed or let go after fork. An `Arc` so that a call in flight keeps
    /// the client alive while another thread closes it (closing fails it, which wakes
    /// that call).
    client: Mutex<Option<Arc<Client>>>,
}

impl Session {
    fn client(&self) -> Result<Arc<Client>, ClientError> {
        let guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .clone()
            .ok_or_else(|| ClientError::Unavailable("client closed".into()))
    }

    /// Wait for the reply to `id`; a signal runs the Python handlers, and an exception
    /// one raises is returned as `Err` (the request stays pending).
    fn wait_interruptible(
        py: Python<'_>,
        client: &Client,
        id: u64,
    ) -> PyResult<Result<Reply, ClientError>> {
        loop {
            match py.detach(|| client.wait_reply(id, true)) {
                Err(ClientError::Interrupted) => py.check_signals()?,
                other => return Ok(other),
            }
        }
    }

    /// Send `body` and wait for its reply in one release of the GIL (a post on the
    /// rings is then one GIL round trip); a signal that interrupts the wait runs the
    /// handlers and the wait goes on.
    fn send_and_wait(
        py: Python<'_>,
        client: &Client,
        body: &RequestBody,
        key: Option<&[u8]>,
    ) -> PyResult<(u64, PyResult<Result<Reply, ClientError>>)> {
        let (id, first) = py
            .detach(|| {
                let id = client.send(body, key)?;
                Ok((id, client.wait_reply(id, true)))
            })
            .map_err(|e: ClientError| to_py(py, &e))?;
        let reply = match first {
            Err(ClientError::Interrupted) => match py.check_signals() {
                Ok(()) => Self::wait_interruptible(py, client, id),
                Err(handler) => Err(handler),
            },
            other => Ok(other),
        };
        Ok((id, reply))
    }

    /// Send `body`, wait for its reply (interruptibly), raise a refusal.
    fn call(&self, py: Python<'_>, body: RequestBody, key: Option<&[u8]>) -> PyResult<Reply> {
        let client = self.client().map_err(|e| to_py(py, &e))?;
        let (_, reply) = Self::send_and_wait(py, &client, &body, key)?;
        match reply {
            // Not a wait: the request stays pending and its reply is dropped when it
            // comes (the Python client keeps it; nobody can ask for it by id here).
            Err(handler) => Err(handler),
            Ok(Err(e)) => Err(to_py(py, &e)),
            Ok(Ok(reply)) if reply.status != Status::OK => Err(to_py(py, &refusal(&reply))),
            Ok(Ok(reply)) => Ok(reply),
        }
    }
}

/// Withdraw the WAIT `id` (PROTOCOL.md 10): CANCEL, both replies, and a unit granted
/// at that instant posted back. Not interruptible: a second signal's handler runs once
/// this returns.
fn withdraw(
    client: &Client,
    id: u64,
    handle: Handle,
    key: Option<&[u8]>,
) -> Result<(), ClientError> {
    let cancel = client.send(&RequestBody::Cancel { target: id }, None)?;
    let fin = client.wait_reply(id, false)?;
    client.wait_reply(cancel, false)?;
    if fin.status == Status::OK {
        client.call(&RequestBody::Post { handle }, key)?;
    }
    Ok(())
}

#[pymethods]
impl Session {
    /// Connect to the service at `sock` and complete the handshake, pinning `pubkey`
    /// (32 bytes); `switchless` 0 stays on the socket, 1 prefers the rings (a refusal
    /// warns and stays on the socket), 2 requires them (a refusal raises
    /// `K_SWITCHLESS`). Raises what the Python client raises (`ServiceUnavailable`, a
    /// refusal's class).
    #[new]
    #[pyo3(signature = (sock, pubkey, switchless=0))]
    fn new(py: Python<'_>, sock: &str, pubkey: &[u8], switchless: u8) -> PyResult<Session> {
        let key: [u8; 32] = pubkey.try_into().map_err(|_| {
            PyValueError::new_err(format!("a service key has 32 bytes, not {}", pubkey.len()))
        })?;
        let mode = match switchless {
            0 => Switchless::Off,
            1 => Switchless::Prefer,
            2 => Switchless::Require,
            n => {
                return Err(PyValueError::new_err(format!(
                    "switchless is 0, 1 or 2, not {n}"
                )))
            }
        };
        let path = Path::new(sock).to_path_buf();
        // A signal during the handshake runs the Python handlers; one that raises ends
        // the connect (the half-made connection closed) with its exception.
        let mut raised: Option<PyErr> = None;
        let (connected, warnings) = py.detach(|| {
            CONNECT_WARNINGS.with(|w| *w.borrow_mut() = Some(Vec::new()));
            let connected =
                Client::connect_to_interruptible(&path, &key, mode, &mut || match Python::attach(
                    |py| py.check_signals(),
                ) {
                    Ok(()) => true,
                    Err(e) => {
                        raised = Some(e);
                        false
                    }
                });
            let warnings = CONNECT_WARNINGS.with(|w| w.borrow_mut().take());
            (connected, warnings.unwrap_or_default())
        });
        log_warnings(py, warnings)?;
        let client = match (connected, raised) {
            (Err(ClientError::Interrupted), Some(handler)) => return Err(handler),
            (result, _) => result.map_err(|e| to_py(py, &e))?,
        };
        Ok(Session {
            client: Mutex::new(Some(Arc::new(client))),
        })
    }

    /// Send any request (the fields of `esem.protocol.messages.Request`); returns its
    /// id, for `wait_reply`. `key` MACs it (key binding).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (opcode, handle, name, oflag, mode, value, create_key, wait_mode,
                        timeout_ns, target, after, key))]
    fn send(
        &self,
        py: Python<'_>,
        opcode: u8,
        handle: &[u8],
        name: &str,
        oflag: u64,
        mode: u64,
        value: u64,
        create_key: Option<&[u8]>,
        wait_mode: u8,
        timeout_ns: u64,
        target: u64,
        after: &str,
        key: Option<&[u8]>,
    ) -> PyResult<u64> {
        let op = Opcode::from_wire(opcode)
            .ok_or_else(|| PyValueError::new_err(format!("unknown opcode {opcode}")))?;
        let body = match op {
            Opcode::OPEN => RequestBody::Open {
                oflag: wire("oflag", oflag)?,
                mode: wire("mode", mode)?,
                value: wire("value", value)?,
                key: create_key.map(<[u8]>::to_vec),
                name: name.to_owned(),
            },
            Opcode::CLOSE => RequestBody::Close {
                handle: handle_arg(handle)?,
            },
            Opcode::UNLINK => RequestBody::Unlink {
                name: name.to_owned(),
            },
            Opcode::WAIT => RequestBody::Wait {
                handle: handle_arg(handle)?,
                mode: WaitMode::from_wire(wait_mode).ok_or_else(|| {
                    PyValueError::new_err(format!("unknown wait mode {wait_mode}"))
                })?,
                timeout_ns,
            },
            Opcode::POST => RequestBody::Post {
                handle: handle_arg(handle)?,
            },
            Opcode::GETVALUE => RequestBody::GetValue {
                handle: handle_arg(handle)?,
            },
            Opcode::CANCEL => RequestBody::Cancel { target },
            Opcode::ATTACH => RequestBody::Attach {
                handle: handle_arg(handle)?,
            },
            Opcode::LIST => RequestBody::List {
                after: after.to_owned(),
            },
            Opcode::STAT => RequestBody::Stat {
                name: name.to_owned(),
            },
            Opcode::PING => RequestBody::Ping,
            Opcode::RECLAIM => RequestBody::Reclaim {
                name: name.to_owned(),
            },
            Opcode::END => RequestBody::End,
            Opcode::SWITCHLESS => {
                return Err(PyValueError::new_err(
                    "a native session does not upgrade to switchless",
                ))
            }
            Opcode::RESUME => {
                return Err(PyValueError::new_err(
                    "a native session resumes by itself (esem-client's reader thread)",
                ))
            }
        };
        let client = self.client().map_err(|e| to_py(py, &e))?;
        py.detach(|| client.send(&body, key))
            .map_err(|e| to_py(py, &e))
    }

    /// Block until the reply to `req_id` arrives; returns `(opcode, req_id, status,
    /// handle, created, value, data, message)`. A refusal is returned, not raised. An
    /// exception from a signal handler propagates and the request stays pending.
    #[allow(clippy::type_complexity)]
    fn wait_reply<'py>(
        &self,
        py: Python<'py>,
        req_id: u64,
    ) -> PyResult<(
        u8,
        u64,
        u16,
        Bound<'py, PyBytes>,
        bool,
        u32,
        Bound<'py, PyBytes>,
        String,
    )> {
        let client = self.client().map_err(|e| to_py(py, &e))?;
        let reply = Self::wait_interruptible(py, &client, req_id)?.map_err(|e| to_py(py, &e))?;
        let message = reply.message();
        let (handle, created, value, data): (&[u8], bool, u32, &[u8]) = match &reply.body {
            ReplyBody::Handle {
                handle, created, ..
            } => (handle, *created, 0, b""),
            ReplyBody::Value(v) => (b"", false, *v, b""),
            ReplyBody::Json(d) => (b"", false, 0, d),
            ReplyBody::Empty | ReplyBody::Refusal(_) | ReplyBody::LastReqId(_) => {
                (b"", false, 0, b"")
            }
        };
        Ok((
            reply.opcode.wire(),
            reply.req_id,
            reply.status.wire(),
            PyBytes::new(py, handle),
            created,
            value,
            PyBytes::new(py, data),
            message,
        ))
    }

    /// OPEN; returns `(handle, created)`. `create_key` travels only with CREAT.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (name, oflag, mode, value, create_key, key))]
    fn open<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        oflag: u8,
        mode: u16,
        value: u32,
        create_key: Option<&[u8]>,
        key: Option<&[u8]>,
    ) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let body = RequestBody::Open {
            oflag,
            mode,
            value,
            key: create_key.map(<[u8]>::to_vec),
            name: name.to_owned(),
        };
        match self.call(py, body, key)?.body {
            ReplyBody::Handle {
                handle, created, ..
            } => Ok((PyBytes::new(py, &handle), created)),
            _ => Err(PyRuntimeError::new_err("OPEN reply without a handle")),
        }
    }

    /// ATTACH an ancestor's handle token; returns this session's handle.
    #[pyo3(signature = (handle, key))]
    fn attach<'py>(
        &self,
        py: Python<'py>,
        handle: &[u8],
        key: Option<&[u8]>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let body = RequestBody::Attach {
            handle: handle_arg(handle)?,
        };
        match self.call(py, body, key)?.body {
            ReplyBody::Handle { handle, .. } => Ok(PyBytes::new(py, &handle)),
            _ => Err(PyRuntimeError::new_err("ATTACH reply without a handle")),
        }
    }

    /// POST one unit.
    #[pyo3(signature = (handle, key))]
    fn post(&self, py: Python<'_>, handle: &[u8], key: Option<&[u8]>) -> PyResult<()> {
        let body = RequestBody::Post {
            handle: handle_arg(handle)?,
        };
        self.call(py, body, key).map(|_| ())
    }

    /// GETVALUE.
    #[pyo3(signature = (handle, key))]
    fn getvalue(&self, py: Python<'_>, handle: &[u8], key: Option<&[u8]>) -> PyResult<u32> {
        let body = RequestBody::GetValue {
            handle: handle_arg(handle)?,
        };
        match self.call(py, body, key)?.body {
            ReplyBody::Value(v) => Ok(v),
            _ => Err(PyRuntimeError::new_err("GETVALUE reply without a value")),
        }
    }

    /// CLOSE a handle.
    #[pyo3(signature = (handle, key))]
    fn close_handle(&self, py: Python<'_>, handle: &[u8], key: Option<&[u8]>) -> PyResult<()> {
        let body = RequestBody::Close {
            handle: handle_arg(handle)?,
        };
        self.call(py, body, key).map(|_| ())
    }

    /// UNLINK a name.
    #[pyo3(signature = (name, key))]
    fn unlink(&self, py: Python<'_>, name: &str, key: Option<&[u8]>) -> PyResult<()> {
        let body = RequestBody::Unlink {
            name: name.to_owned(),
        };
        self.call(py, body, key).map(|_| ())
    }

    /// WAIT (`wait_mode` 0 try, 1 block, 2 timed). A refusal (EAGAIN, ETIMEDOUT, ...)
    /// is raised. If a signal handler raises, the wait is withdrawn (a unit granted at
    /// that instant is posted back) and the handler's exception propagates.
    #[pyo3(signature = (handle, wait_mode, timeout_ns, key))]
    fn wait(
        &self,
        py: Python<'_>,
        handle: &[u8],
        wait_mode: u8,
        timeout_ns: u64,
        key: Option<&[u8]>,
    ) -> PyResult<()> {
        let handle = handle_arg(handle)?;
        let mode = WaitMode::from_wire(wait_mode)
            .ok_or_else(|| PyValueError::new_err(format!("unknown wait mode {wait_mode}")))?;
        let client = self.client().map_err(|e| to_py(py, &e))?;
        let body = RequestBody::Wait {
            handle,
            mode,
            timeout_ns,
        };
        let (id, reply) = Self::send_and_wait(py, &client, &body, key)?;
        match reply {
            Err(handler) => match py.detach(|| withdraw(&client, id, handle, key)) {
                Ok(()) => Err(handler),
                // The session failed meanwhile: that is the error, the handler's is its
                // context (as a Python `raise` inside `except` would chain it).
                Err(e) => {
                    let err = to_py(py, &e);
                    err.set_cause(py, Some(handler));
                    Err(err)
                }
            },
            Ok(Err(e)) => Err(to_py(py, &e)),
            Ok(Ok(reply)) if reply.status != Status::OK => Err(to_py(py, &refusal(&reply))),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The session's transport now: "switchless" (the rings) or "socket" (also once
    /// closed, and while a session that had rings resumes over the socket).
    fn mode(&self, py: Python<'_>) -> &'static str {
        // Not under the GIL: the reader thread holds the session's lock while it asks
        // a restarted service for rings again.
        self.client().map_or("socket", |c| py.detach(|| c.mode()))
    }

    /// The error that ended the session (an exception object), or None while usable.
    fn failure<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => return exception(py, &e).map(Some),
        };
        match client.failure() {
            Some(e) => exception(py, &e).map(Some),
            None => Ok(None),
        }
    }

    /// End the session: every waiter wakes with `ServiceUnavailable("client closed")`.
    fn close(&self) {
        let taken = self.client.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = taken {
            c.close();
        }
    }

    /// In a fork child: close the child's copy of the socket, send nothing, and never
    /// free the parent's client here (its lock may be held by a thread that is gone).
    fn abandon_in_child(&self) {
        // The lock itself may be held by a thread of the parent: try it only.
        let taken = match self.client.try_lock() {
            Ok(mut g) => g.take(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().take(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if let Some(c) = taken {
            c.abandon_in_child();
            std::mem::forget(c);
        }
    }
}

thread_local! {
    /// While this thread connects a `Session`: the native client's warnings, logged on
    /// Python's logger once the connect returns.
    static CONNECT_WARNINGS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// The native client's warning hook. A warning of a connect made from Python (a
/// refused upgrade it was only to prefer) is kept for `log_warnings`; any other (the
/// reader thread's re-upgrade after a resume, which holds the session's lock, so it
/// must not wait for the GIL) goes to stderr, as the native client's always do.
fn keep_warning(text: &str) {
    let kept = CONNECT_WARNINGS.with(|w| match w.borrow_mut().as_mut() {
        Some(kept) => {
            kept.push(text.to_owned());
            true
        }
        None => false,
    });
    if !kept {
        eprintln!("esem: {text}");
    }
}

/// Log `warnings` on the `esem.client` logger, as the Python client logs them.
fn log_warnings(py: Python<'_>, warnings: Vec<String>) -> PyResult<()> {
    if warnings.is_empty() {
        return Ok(());
    }
    let printable = py.import("esem.safe_text")?.getattr("printable")?;
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("esem.client",))?;
    for text in warnings {
        logger.call_method1("warning", ("%s", printable.call1((text,))?))?;
    }
    Ok(())
}

/// The module: `Session`, `set_error_factory`, and the kinds the factory receives.
#[pymodule]
fn _native_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Session>()?;
    m.add_class::<server::ServerCodec>()?;
    ring_server::register(m)?;
    m.add_function(wrap_pyfunction!(set_error_factory, m)?)?;
    m.add("K_STATUS", K_STATUS)?;
    m.add("K_PROTOCOL", K_PROTOCOL)?;
    m.add("K_INTEGRITY", K_INTEGRITY)?;
    m.add("K_UNAVAILABLE", K_UNAVAILABLE)?;
    m.add("K_INVALID", K_INVALID)?;
    m.add("K_INTERRUPTED", K_INTERRUPTED)?;
    m.add("K_SWITCHLESS", K_SWITCHLESS)?;
    ring::set_warning_hook(keep_warning);
    Ok(())
}
