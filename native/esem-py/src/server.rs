//! `esem._native_core.ServerCodec`: the service's per-request transport work in native
//! code, for `esem.protocol.session.ServerSession` once its handshake is over.
//!
//! The Noise handshake stays in Python (`noiseprotocol`); the two transport directions
//! (key and nonce counter of each CipherState after `Split()`) are handed over here.
//! One `open` call frame-splits a read, decrypts and decodes every whole frame with
//! esem-proto (the one native codec), and returns the decoded fields of each request
//! as a plain tuple; `seal`/`seal_reply` append `frame(encrypt(body))` to one output
//! buffer that `take` empties once per wake-up (one `write`).
//!
//! Errors keep the Python reference's contract: a frame length out of range raises
//! `ProtocolError` at once (nothing of that read is processed); a frame that fails to
//! decrypt or decode ends the batch with the exception *returned*, after the requests
//! before it, so the shell executes those first and then closes. After any error the
//! codec refuses all further input: later frames are never processed.

use esem_proto::crypto::{keybind_mac, CipherState, SessionId};
use esem_proto::frame::FrameDecoder;
use esem_proto::msg::{decode_request, encode_reply, RequestBody};
use esem_proto::{Direction, Error as ProtoError, Opcode, Reply, ReplyBody, Status};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyList, PyTuple};
use pyo3::IntoPyObjectExt;

/// `esem.errors.ProtocolError` and `IntegrityError`, looked up once.
static ERRORS: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();

fn errors(py: Python<'_>) -> PyResult<&(Py<PyAny>, Py<PyAny>)> {
    ERRORS.get_or_try_init(py, || {
        let m = py.import("esem.errors")?;
        Ok((
            m.getattr("ProtocolError")?.unbind(),
            m.getattr("IntegrityError")?.unbind(),
        ))
    })
}

/// The Python exception instance for a peer's failure (misuse is `ValueError`).
fn exception<'py>(py: Python<'py>, e: &ProtoError) -> PyResult<Bound<'py, PyAny>> {
    let (protocol, integrity) = errors(py)?;
    match e {
        ProtoError::Protocol(m) => protocol.bind(py).call1((m.as_str(),)),
        ProtoError::Integrity(m) => integrity.bind(py).call1((m.as_str(),)),
        other => PyValueError::new_err(other.to_string()).into_bound_py_any(py),
    }
}

fn to_err(py: Python<'_>, e: &ProtoError) -> PyErr {
    match exception(py, e) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// One request as `(opcode, req_id, signed, mac, fields)`, `fields` by opcode: the
/// handle (CLOSE POST GETVALUE ATTACH); `(handle, wait_mode, timeout_ns)` (WAIT);
/// `(name, oflag, mode, value, key)` (OPEN); the name (UNLINK STAT RECLAIM); the target
/// (CANCEL); the cursor (LIST); `(session, secret, awaited)` (RESUME); None otherwise.
fn request_tuple<'py>(
    py: Python<'py>,
    plaintext: &[u8],
) -> Result<Bound<'py, PyTuple>, ProtoError> {
    let d = decode_request(plaintext)?;
    let req = d.message;
    let op = req.body.opcode().wire();
    let conv = |r: PyResult<Bound<'py, PyAny>>| r.map_err(|e| ProtoError::Misuse(e.to_string()));
    let fields: Bound<'py, PyAny> = match &req.body {
        RequestBody::Close { handle }
        | RequestBody::Post { handle }
        | RequestBody::GetValue { handle }
        | RequestBody::Attach { handle } => PyBytes::new(py, handle).into_any(),
        RequestBody::Wait {
            handle,
            mode,
            timeout_ns,
        } => conv((PyBytes::new(py, handle), mode.wire(), *timeout_ns).into_bound_py_any(py))?,
        RequestBody::Open {
            oflag,
            mode,
            value,
            key,
            name,
        } => conv(
            (
                name.as_str(),
                *oflag,
                *mode,
                *value,
                key.as_deref().map(|k| PyBytes::new(py, k)),
            )
                .into_bound_py_any(py),
        )?,
        RequestBody::Unlink { name }
        | RequestBody::Stat { name }
        | RequestBody::Reclaim { name } => conv(name.as_str().into_bound_py_any(py))?,
        RequestBody::Cancel { target } => conv(target.into_bound_py_any(py))?,
        RequestBody::List { after } => conv(after.as_str().into_bound_py_any(py))?,
        RequestBody::Resume {
            session,
            secret,
            awaited,
        } => {
            let awaited = conv(PyTuple::new(py, awaited).map(Bound::into_any))?;
            conv(
                (PyBytes::new(py, session), PyBytes::new(py, secret), awaited)
                    .into_bound_py_any(py),
            )?
        }
        RequestBody::Ping | RequestBody::Switchless | RequestBody::End => py.None().into_bound(py),
    };
    let mac = d.mac.as_ref().map(|m| PyBytes::new(py, m));
    let t = (op, req.req_id, PyBytes::new(py, &d.signed), mac, fields).into_pyobject(py);
    conv(t.map(Bound::into_any))?
        .cast_into::<PyTuple>()
        .map_err(|e| ProtoError::Misuse(e.to_string()))
}

/// The two transport directions of one established session, its partial input frame
/// and its queued output.
#[pyclass(module = "esem._native_core")]
pub struct ServerCodec {
    rx: CipherState,
    tx: CipherState,
    frames: FrameDecoder,
    out: Vec<u8>,
    failed: bool,
}

#[pymethods]
impl ServerCodec {
    /// Take over the CipherStates `(rx_key, rx_n)` (client to service) and `(tx_key,
    /// tx_n)` after the handshake; `pending` is input already read past the handshake.
    #[new]
    #[pyo3(signature = (rx_key, rx_n, tx_key, tx_n))]
    fn new(rx_key: &[u8], rx_n: u64, tx_key: &[u8], tx_n: u64) -> PyResult<Self> {
        let bad = |e: ProtoError| PyValueError::new_err(e.to_string());
        Ok(ServerCodec {
            rx: CipherState::new(rx_key, rx_n).map_err(bad)?,
            tx: CipherState::new(tx_key, tx_n).map_err(bad)?,
            frames: FrameDecoder::new(),
            out: Vec::new(),
            failed: false,
        })
    }

    /// Every whole request of `data` (after what an earlier call kept of a partial
    /// frame): `(requests, error)`, `error` None or the exception the frame after the
    /// last request raised. A frame length out of range raises `ProtocolError`.
    fn open<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<(Bound<'py, PyList>, Option<Bound<'py, PyAny>>)> {
        if self.failed {
            return Err(to_err(
                py,
                &ProtoError::Protocol("session is closed".into()),
            ));
        }
        let bodies = match self.frames.feed(data) {
            Ok(b) => b,
            Err(e) => {
                self.failed = true;
                return Err(to_err(py, &e));
            }
        };
        let list = PyList::empty(py);
        for body in &bodies {
            let step = self.rx.open(body).and_then(|p| request_tuple(py, &p));
            match step {
                Ok(t) => list.append(t)?,
                Err(e) => {
                    self.failed = true;
                    return Ok((list, Some(exception(py, &e)?)));
                }
            }
        }
        Ok((list, None))
    }

    /// Queue `frame(encrypt(body))` for the peer (`body` a reply message, MAC included).
    /// Too large a body is a `ValueError` and uses up no nonce.
    fn seal(&mut self, py: Python<'_>, body: &[u8]) -> PyResult<()> {
        self.tx
            .seal_frame(body, &mut self.out)
            .map_err(|e| to_err(py, &e))
    }

    /// Encode a reply with no payload or a u32 `value` (OK), or a refusal carrying
    /// `message` (UTF-8, cut at the limit), with its key-binding MAC under `mac_key`
    /// bound to `binding`; queue it as `seal` does and return its body (for the replay
    /// window and the journal).
    #[pyo3(signature = (opcode, req_id, status, value, message, mac_key, binding))]
    #[allow(clippy::too_many_arguments)]
    fn seal_reply<'py>(
        &mut self,
        py: Python<'py>,
        opcode: u8,
        req_id: u64,
        status: u16,
        value: u32,
        message: &str,
        mac_key: Option<&[u8]>,
        binding: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let bad = |m: String| PyValueError::new_err(m);
        let opcode = Opcode::from_wire(opcode).ok_or_else(|| bad(format!("opcode {opcode}")))?;
        let status = Status::from_wire(status).ok_or_else(|| bad(format!("status {status}")))?;
        let body = if status != Status::OK {
            ReplyBody::Refusal(message.as_bytes().to_vec())
        } else if matches!(
            opcode,
            Opcode::GETVALUE | Opcode::CANCEL | Opcode::SWITCHLESS | Opcode::RECLAIM
        ) {
            ReplyBody::Value(value)
        } else {
            ReplyBody::Empty
        };
        let reply = Reply {
            opcode,
            req_id,
            status,
            body,
        };
        let mut msg = encode_reply(&reply, mac_key.is_some()).map_err(|e| bad(e.to_string()))?;
        if let Some(key) = mac_key {
            let sid = SessionId::try_from(binding)
                .map_err(|_| bad(format!("binding id of {} bytes", binding.len())))?;
            let mac = keybind_mac(key, &sid, Direction::TO_CLIENT, &msg)
                .map_err(|e| bad(e.to_string()))?;
            msg.extend_from_slice(&mac);
        }
        self.tx
            .seal_frame(&msg, &mut self.out)
            .map_err(|e| to_err(py, &e))?;
        Ok(PyBytes::new(py, &msg))
    }

    /// All queued output, once.
    fn take<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let b = PyBytes::new(py, &self.out);
        self.out.clear();
        b
    }

    /// Bytes queued and not yet taken.
    #[getter]
    fn buffered(&self) -> usize {
        self.out.len()
    }

    /// The next nonce counters `(rx, tx)` (for tests).
    #[getter]
    fn nonces(&self) -> (u64, u64) {
        (self.rx.nonce(), self.tx.nonce())
    }
}
