//! `esem._native_core.ServiceRing`: the service's two ring ends of one switchless
//! session (requests in, replies out) in native code, for `esem.server.switchless`.
//!
//! It is `esem.protocol.ring`'s service ends (`Consumer` of requests, `Producer` of
//! replies) with the same methods, checks and errors: the index rules are
//! `esem_proto::ring`'s (`ConsumerIndex`/`ProducerIndex`, the one native copy of them),
//! the memory is touched only through the native client's `Shm` (bounds-checked atomic
//! loads and stores into a mapping it owns), so a client writing the region at the same
//! time can change what we read, never the soundness of reading it. Our counters are
//! private and the region's copies only ever written from them; a refused index or span
//! raises `esem.protocol.ring.RingError`, as the Python reference does.
//!
//! `rings_ready` and `rings_awake_unread` answer the poller's two per-spin questions over
//! every session's ring in one call, so an idle spin pass is one native call instead of
//! a Python loop over the sessions.

use esem_client::ring::{send_bell, RegionError, Shm};
use esem_proto::ring::{check_capacity, offset, region_size, reply_area, request_area};
use esem_proto::ring::{ConsumerIndex, ProducerIndex, Spans};
use esem_proto::Error as ProtoError;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyTuple};
use std::sync::atomic::{fence, Ordering};

/// `esem.protocol.ring.RingError`, looked up once.
static RING_ERROR: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn ring_error(py: Python<'_>, message: &str) -> PyErr {
    let cls = RING_ERROR.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("esem.protocol.ring")?.getattr("RingError")?.unbind())
    });
    match cls.and_then(|c| c.bind(py).call1((message,))) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

fn to_err(py: Python<'_>, e: &ProtoError) -> PyErr {
    match e {
        ProtoError::Protocol(m) | ProtoError::Integrity(m) => ring_error(py, m),
        other => PyValueError::new_err(other.to_string()),
    }
}

fn closed() -> PyErr {
    PyValueError::new_err("the switchless ring is closed")
}

/// One byte on the doorbell socket `fd`, non-blocking, errors ignored (EINTR retried).
fn ring(fd: i32) {
    while matches!(send_bell(fd), Err(e) if e.kind() == std::io::ErrorKind::Interrupted) {}
}

/// The service's ends of one session's region.
#[pyclass(module = "esem._native_core")]
pub struct ServiceRing {
    shm: Option<Shm>,
    capacity: u64,
    rx: ConsumerIndex,
    tx: ProducerIndex,
}

impl ServiceRing {
    fn shm(&self) -> PyResult<&Shm> {
        self.shm.as_ref().ok_or_else(closed)
    }

    /// Request bytes ready (checked: never more than the ring holds).
    fn ready(&self, shm: &Shm) -> Result<u64, ProtoError> {
        self.rx.available(shm.load(offset::REQ_HEAD))
    }

    fn unread(&self, shm: &Shm) -> Result<u64, ProtoError> {
        self.tx.used(shm.load(offset::REP_TAIL))
    }

    fn peer_sleeps(shm: &Shm) -> bool {
        fence(Ordering::SeqCst); // our head store before the flag load (ring.py's fence)
        shm.load(offset::REP_SLEEP) != 0
    }

    /// The spans checked against the data area once more before memory is touched.
    fn inside(&self, spans: &Spans) -> bool {
        let cap = self.capacity as usize;
        spans.first.0 + spans.first.1 <= cap && spans.second.0 + spans.second.1 <= cap
    }
}

#[pymethods]
impl ServiceRing {
    /// Map the region of the memfd `fd` (a regular file of exactly the region's size
    /// for rings of `capacity` bytes, sealed against shrinking: a shrink under the
    /// mapping would SIGBUS the service) and take the service's ends, both private
    /// counters at `start` (tests of the wrap; a session starts at zero). The header
    /// is the creator's business (`Region.initialize`) and is never read here.
    #[new]
    #[pyo3(signature = (fd, capacity, start = 0))]
    fn new(py: Python<'_>, fd: i32, capacity: u64, start: u64) -> PyResult<Self> {
        let capacity = check_capacity(capacity).map_err(|e| to_err(py, &e))?;
        let size = region_size(capacity).map_err(|e| to_err(py, &e))?;
        let shm = Shm::map_region(fd, size).map_err(|e| match e {
            RegionError::Unusable(e) | RegionError::NotMemfd(e) | RegionError::Map(e) => {
                PyOSError::new_err(e)
            }
            RegionError::WrongSize => {
                ring_error(py, "shared region has the wrong size or is read-only")
            }
            RegionError::NotSealed => {
                ring_error(py, "shared region is not sealed against shrinking")
            }
        })?;
        let bad = |e: ProtoError| to_err(py, &e);
        Ok(ServiceRing {
            shm: Some(shm),
            capacity,
            rx: ConsumerIndex::new(capacity, start).map_err(bad)?,
            tx: ProducerIndex::new(capacity, start).map_err(bad)?,
        })
    }

    fn __repr__(&self) -> String {
        let state = if self.shm.is_some() { "" } else { " closed" };
        format!(
            "<ServiceRing tail={} head={} capacity={}{state}>",
            self.rx.tail(),
            self.tx.head(),
            self.capacity
        )
    }

    #[getter]
    fn capacity(&self) -> u64 {
        self.capacity
    }

    // ---------------------------------------------------------- requests in

    /// Request bytes ready to read (`Consumer.available`).
    fn available(&self, py: Python<'_>) -> PyResult<u64> {
        self.ready(self.shm()?).map_err(|e| to_err(py, &e))
    }

    /// What is ready (at most `limit` bytes), copied out of shared memory, then
    /// released to the client; b"" when the ring is empty (`Consumer.read`).
    #[pyo3(signature = (limit = None))]
    fn read<'py>(&mut self, py: Python<'py>, limit: Option<usize>) -> PyResult<Bound<'py, PyBytes>> {
        let shm = self.shm.as_ref().ok_or_else(closed)?;
        let head = shm.load(offset::REQ_HEAD);
        // Nothing ready: nothing published (as the reference, which checks the index
        // only when there is something to read).
        if head == self.rx.tail() {
            return Ok(PyBytes::new(py, b""));
        }
        let spans = self
            .rx
            .plan_read(head, limit.unwrap_or(usize::MAX))
            .map_err(|e| to_err(py, &e))?;
        if !self.inside(&spans) {
            return Err(ring_error(py, "request ring span out of range"));
        }
        let area = request_area(self.capacity);
        let (a, b) = (spans.first, spans.second);
        let out = PyBytes::new_with(py, spans.len(), |buf| {
            let (x, y) = buf.split_at_mut(a.1);
            if shm.read_at(area + a.0, x) && shm.read_at(area + b.0, y) {
                Ok(())
            } else {
                Err(ring_error(py, "request ring span out of range"))
            }
        })?;
        // Released only once copied: until then the client may not reuse the bytes.
        let tail = self.rx.commit(&spans);
        shm.store(offset::REQ_TAIL, tail);
        Ok(out)
    }

    /// Say we are about to sleep, then re-check: what became ready meanwhile
    /// (`Consumer.sleep`).
    fn sleep(&self, py: Python<'_>) -> PyResult<u64> {
        let shm = self.shm()?;
        shm.store(offset::REQ_SLEEP, 1);
        fence(Ordering::SeqCst); // the flag store before the head load
        self.ready(shm).map_err(|e| to_err(py, &e))
    }

    /// We are awake: the client need not ring (`Consumer.wake`).
    fn wake(&self) -> PyResult<()> {
        self.shm()?.store(offset::REQ_SLEEP, 0);
        Ok(())
    }

    /// Everything read so far is processed (`Consumer.done`).
    fn done(&self) -> PyResult<()> {
        self.shm()?.store(offset::REQ_DONE, self.rx.tail());
        Ok(())
    }

    // ---------------------------------------------------------- replies out

    /// Copy as much of `data` as fits into the reply ring and publish it; returns how
    /// many bytes were written (`Producer.write`).
    fn write(&mut self, py: Python<'_>, data: PyBackedBytes) -> PyResult<usize> {
        let shm = self.shm.as_ref().ok_or_else(closed)?;
        let spans = self
            .tx
            .plan_write(shm.load(offset::REP_TAIL), data.len())
            .map_err(|e| to_err(py, &e))?;
        if spans.is_empty() && !data.is_empty() {
            return Ok(0); // full: nothing published (an empty write republishes the head)
        }
        let area = reply_area(self.capacity);
        let (a, b) = (spans.first, spans.second);
        if !(self.inside(&spans)
            && shm.write_at(area + a.0, &data[..a.1])
            && shm.write_at(area + b.0, &data[a.1..a.1 + b.1]))
        {
            return Err(ring_error(py, "reply ring span out of range"));
        }
        let head = self.tx.commit(&spans);
        shm.store(offset::REP_HEAD, head); // Release: after the bytes
        Ok(spans.len())
    }

    /// `write`, then, as the service's `send_ring` does, ring the client's doorbell
    /// `bell` (a descriptor of ours, -1 for none) if the client says it sleeps: one
    /// byte, never blocking. A full doorbell already has rings the client will read; a
    /// dead one is its socket's EOF on the way: both are ignored, as in Python.
    fn send(&mut self, py: Python<'_>, data: PyBackedBytes, bell: i32) -> PyResult<usize> {
        let n = self.write(py, data)?;
        if bell >= 0 && Self::peer_sleeps(self.shm()?) {
            ring(bell);
        }
        Ok(n)
    }

    /// Bytes that can be written now (`Producer.free`).
    fn free(&self, py: Python<'_>) -> PyResult<u64> {
        let used = self.unread(self.shm()?).map_err(|e| to_err(py, &e))?;
        Ok(self.capacity - used)
    }

    /// Reply bytes the client has not taken yet (`Producer.unconsumed`).
    fn unconsumed(&self, py: Python<'_>) -> PyResult<u64> {
        self.unread(self.shm()?).map_err(|e| to_err(py, &e))
    }

    /// After a write: does the client say it sleeps (`Producer.peer_sleeping`)?
    fn peer_sleeping(&self) -> PyResult<bool> {
        Ok(Self::peer_sleeps(self.shm()?))
    }

    /// Unmap the region; every method but this one raises `ValueError` afterwards.
    fn close(&mut self) {
        self.shm = None;
    }

    #[getter]
    fn closed(&self) -> bool {
        self.shm.is_none()
    }
}

/// Is anything waiting in any of `rings` (a tuple of `ServiceRing`): request bytes, or
/// an index no honest client writes (so that the caller's read raises and ends that
/// session)? Closed rings are skipped.
#[pyfunction]
pub fn rings_ready(rings: &Bound<'_, PyTuple>) -> PyResult<bool> {
    for item in rings.iter() {
        let ring = item.cast::<ServiceRing>()?.borrow();
        if let Some(shm) = &ring.shm {
            if !matches!(ring.ready(shm), Ok(0)) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Does any of `rings` hold replies unread while its client says it is awake
/// (`SwitchlessConnection.awake_with_unread_replies`)? A bad index counts as no.
#[pyfunction]
pub fn rings_awake_unread(rings: &Bound<'_, PyTuple>) -> PyResult<bool> {
    for item in rings.iter() {
        let ring = item.cast::<ServiceRing>()?.borrow();
        if let Some(shm) = &ring.shm {
            if ring.unread(shm).is_ok_and(|n| n > 0) && !ServiceRing::peer_sleeps(shm) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Add `ServiceRing` and the two poller checks to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ServiceRing>()?;
    m.add_function(wrap_pyfunction!(rings_ready, m)?)?;
    m.add_function(wrap_pyfunction!(rings_awake_unread, m)?)?;
    Ok(())
}
