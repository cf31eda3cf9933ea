//! The switchless transport of the native client (PROTOCOL.md 15): the upgrade, the
//! shared region, and the two rings as a byte stream for the session's frames.
//!
//! The rings carry exactly the bytes the socket would carry, made and checked by the
//! same `ClientSession`, so nothing in the shared memory is trusted but what the AEAD
//! authenticates. The region is writable by the service and, in the threat model, by
//! any process of our uid (it opens the memfd through `/proc/PID/fd`), so:
//!
//! * every counter read from the region goes through `esem_proto::ring`'s index rules
//!   against our private copy (`ProducerIndex`/`ConsumerIndex`), and every copy is
//!   bounds-checked again here against the data area before memory is touched;
//! * bytes are copied out before they are parsed or decrypted (never parsed in place);
//! * the memfd must be a regular file of exactly the region's size, sealed against
//!   shrinking (a shrink under our mapping would SIGBUS the host program), and the
//!   doorbell a Unix stream socket; the header must match the authenticated capacity.
//!
//! This module holds the client's only `unsafe` besides `sys.rs`: the mapping, and the
//! atomic loads and stores into it. Every access goes through `Shm`, which checks the
//! offset against the mapping's length and only ever touches it through atomics (u64
//! for the counters, u8 for the data), so a peer writing the memory at the same time
//! can change the values we read, never the soundness of reading them.

use crate::error::{ClientError, Result};
use crate::sys;
use esem_proto::ring::{
    check_capacity, check_header, offset, region_size, reply_area, request_area, ConsumerIndex,
    ProducerIndex, Spans,
};
use esem_proto::{ClientSession, Error as ProtoError, RequestBody, Status};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The environment switch, as the Python client reads it (`esem.client.switchless`).
pub const ENV: &str = "ESEM_SWITCHLESS";
/// How long a caller spins on the reply ring for its reply before it sleeps: longer
/// than the service takes to answer a post (a few to tens of us), far shorter than any
/// blocking wait worth sleeping through.
pub const CLIENT_SPIN: Duration = Duration::from_micros(200);
/// How long it spins at most once the service says it has processed everything we
/// sent without answering: what is left is a queued wait, which only another
/// session's post ends (a short spin still catches a quick hand-off).
pub const PARKED_SPIN: Duration = Duration::from_micros(50);
/// Spinning without giving the CPU up for at most this long, and only while the service
/// has taken every request we sent (it is at work elsewhere); otherwise, and after it,
/// yielding on every turn: a service (or a thread that will post) sharing our vCPU must
/// get it.
pub const PURE_SPIN: Duration = Duration::from_micros(5);
/// The reader thread's longest sleep while requests are outstanding: the backstop for
/// a wake-up lost to a lying or slow flag (it rings the service again if our requests
/// still sit unread).
pub const BACKSTOP: Duration = Duration::from_millis(50);
/// How long a sender waits for room in a full request ring before the session fails.
pub const FULL_RING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a session waits at most for the service to have taken its END
/// from the request ring (`ClientRing::linger`), as the Python client does.
pub const END_LINGER: Duration = Duration::from_millis(200);
/// Bytes copied out of the reply ring per read.
pub const READ_BYTES: usize = 65536;
const UPGRADE_FDS: usize = 2;

/// Whether and how a client asks for switchless mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switchless {
    /// Socket mode.
    Off,
    /// Ask; a refusal falls back to the socket with a warning (`ESEM_SWITCHLESS=1`).
    Prefer,
    /// Ask; a refusal is an error (`ClientError::Unavailable`).
    Require,
}

impl Switchless {
    /// What `ESEM_SWITCHLESS` asks for: `Prefer` for 1/true/yes/on, `Off` for
    /// unset/empty/0/false/no/off, and `Off` with a warning for anything else (as the
    /// Python client reads it).
    pub fn from_environment() -> Switchless {
        let raw = std::env::var(ENV).unwrap_or_default();
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Switchless::Prefer,
            "" | "0" | "false" | "no" | "off" => Switchless::Off,
            _ => {
                warn(&format!(
                    "{ENV}={raw:?} is neither 1 nor 0; using socket mode"
                ));
                Switchless::Off
            }
        }
    }
}

/// How the error of a refused upgrade that was required begins (`Switchless::Require`):
/// a binding tells it from other unavailability by this (Python's
/// `SwitchlessUnavailable`).
pub const REFUSED: &str = "the esem service refused switchless mode";

/// Where warnings go instead of stderr, once a binding with a logger of its own set it.
static WARNING_HOOK: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Send this library's warnings (a refused upgrade under `Prefer`) to `hook` instead of
/// stderr, for the rest of the process: a language binding's logger (Python's
/// `esem.client` logger). False if a hook was already set (the first one stays).
pub fn set_warning_hook(hook: fn(&str)) -> bool {
    WARNING_HOOK.set(hook).is_ok()
}

/// A warning for the program's user, on stderr (the native client has no logger) or to
/// the binding's hook; the text is ours or escaped, never raw peer bytes.
fn warn(text: &str) {
    match WARNING_HOOK.get() {
        Some(hook) => hook(text),
        None => eprintln!("esem: {text}"),
    }
}

/// Ring a doorbell socket `fd`: one byte, never blocking, without SIGPIPE (the ring
/// ends of both sides; the service's ignores every error but EINTR, which it retries).
pub fn send_bell(fd: RawFd) -> std::io::Result<()> {
    sys::send_byte(fd)
}

// ------------------------------------------------------------------ the mapping

/// Why a descriptor is not a usable switchless region (`Shm::map_region`).
#[derive(Debug)]
pub enum RegionError {
    /// It cannot be looked at (`fstat` failed).
    Unusable(std::io::Error),
    /// Not a regular file of the region's size.
    WrongSize,
    /// Its seals cannot be read: not a memfd.
    NotMemfd(std::io::Error),
    /// Not sealed against shrinking.
    NotSealed,
    /// It cannot be mapped.
    Map(std::io::Error),
}

/// A shared mapping, touched only through bounds-checked atomics.
pub struct Shm {
    base: *mut u8,
    len: usize,
}

// SAFETY: `Shm` owns its mapping (unmapped once, in Drop) and every access to it is
// atomic, so sharing or moving it between threads cannot race in the Rust sense.
unsafe impl Send for Shm {}
// SAFETY: as above: `&Shm` only allows atomic loads and stores.
unsafe impl Sync for Shm {}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shm").field("len", &self.len).finish()
    }
}

impl Shm {
    fn mmap(fd: RawFd, len: usize, flags: i32) -> std::io::Result<Shm> {
        // SAFETY: a new mapping chosen by the kernel (addr NULL): it aliases no Rust
        // object. `len` is the region's size, which the caller checked is the file's.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Shm {
            base: p.cast(),
            len,
        })
    }

    /// Map `len` bytes of the file `fd` shared, read-write.
    pub fn map_file(fd: RawFd, len: usize) -> std::io::Result<Shm> {
        Self::mmap(fd, len, libc::MAP_SHARED)
    }

    /// Map a switchless region that the peer handed over: only a regular file of
    /// exactly `size` bytes that is sealed against shrinking (anyone holding it could
    /// otherwise shrink it under our mapping: SIGBUS, not an error). The one check of
    /// both ends, the client's (`ClientRing::attach`) and the service's (esem-py's
    /// `ServiceRing`).
    pub fn map_region(fd: RawFd, size: usize) -> std::result::Result<Shm, RegionError> {
        let st = sys::fstat(fd).map_err(RegionError::Unusable)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size as u64 != size as u64 {
            return Err(RegionError::WrongSize);
        }
        let seals = sys::get_seals(fd).map_err(RegionError::NotMemfd)?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RegionError::NotSealed);
        }
        Self::map_file(fd, size).map_err(RegionError::Map)
    }

    /// A zeroed shared anonymous mapping of `len` bytes (tests, and the property tests
    /// that play the service and the adversary on the same code path).
    pub fn anonymous(len: usize) -> std::io::Result<Shm> {
        Self::mmap(-1, len, libc::MAP_SHARED | libc::MAP_ANONYMOUS)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The u64 at byte `off` (8-aligned, inside the mapping), else `None`.
    fn word(&self, off: usize) -> Option<&AtomicU64> {
        if !off.is_multiple_of(8) || off.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: in bounds (checked above) of a live mapping that is page-aligned, so
        // `base + off` is 8-aligned; AtomicU64 has u64's layout, and this module only
        // ever accesses the word atomically. The peer may write it at any time: an
        // atomic load then sees some u64, every bit pattern being a valid one.
        Some(unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) })
    }

    fn byte(&self, off: usize) -> Option<&AtomicU8> {
        if off >= self.len {
            return None;
        }
        // SAFETY: in bounds of the live mapping (checked above); AtomicU8 has u8's
        // layout and alignment, and the byte is only ever accessed atomically here.
        Some(unsafe { AtomicU8::from_ptr(self.base.add(off)) })
    }

    /// Load the counter at `off` (Acquire: the bytes it publishes are visible after).
    /// An offset outside the mapping reads as 0 (never happens with `offset::*`).
    pub fn load(&self, off: usize) -> u64 {
        self.word(off).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Store the counter at `off` (Release: after the bytes it publishes).
    pub fn store(&self, off: usize, v: u64) {
        if let Some(w) = self.word(off) {
            w.store(v, Ordering::Release);
        }
    }

    /// Copy `out.len()` bytes from `off` out of the mapping; false (nothing copied) if
    /// the range is not inside it.
    pub fn read_at(&self, off: usize, out: &mut [u8]) -> bool {
        if off.checked_add(out.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.byte(off + i).map_or(0, |a| a.load(Ordering::Relaxed));
        }
        true
    }

    /// Copy `data` into the mapping at `off`; false (nothing written) if it does not fit.
    pub fn write_at(&self, off: usize, data: &[u8]) -> bool {
        if off.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        for (i, b) in data.iter().enumerate() {
            if let Some(a) = self.byte(off + i) {
                a.store(*b, Ordering::Relaxed);
            }
        }
        true
    }

    /// (address, length), for the fork child's `forget_in_child`.
    pub(crate) fn raw(&self) -> (usize, usize) {
        (self.base as usize, self.len)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `mmap`, unmapped exactly once; no reference into
        // it outlives `self` (every accessor borrows `self`).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// In a fork child: drop the parent's mapping and close our copies of its ring
/// descriptors, without touching the memory or any lock (async-signal-safe). The
/// objects that own them belong to the parent and are never used in the child.
pub(crate) fn forget_in_child(map: (usize, usize), fds: (RawFd, RawFd)) {
    if map.1 != 0 {
        // SAFETY: the child's copy of the parent's mapping, which the child never
        // accesses again (its session is dead: every call checks the pid first).
        unsafe { libc::munmap(map.0 as *mut libc::c_void, map.1) };
    }
    sys::close_raw(fds.0);
    sys::close_raw(fds.1);
}

// -------------------------------------------------------------------- the rings

fn ring_error(what: &str) -> ProtoError {
    ProtoError::Protocol(what.to_owned())
}

/// The client's two ends over a region: requests out, replies in. Pure memory and
/// index work (no system call), so the property tests drive it on an anonymous
/// mapping with an adversary writing the same memory.
#[derive(Debug)]
pub struct Rings {
    shm: Shm,
    capacity: u64,
    tx: ProducerIndex,
    rx: ConsumerIndex,
}

impl Rings {
    /// The client's ends over `shm`, after checking the header the service wrote
    /// against the capacity of the authenticated reply.
    pub fn attach(shm: Shm, capacity: u64) -> std::result::Result<Rings, ProtoError> {
        Self::attach_at(shm, capacity, 0)
    }

    /// `attach` with both private counters starting at `start` instead of zero (the
    /// tests of the wrap at 2^64; an honest session always starts at zero).
    pub fn attach_at(
        shm: Shm,
        capacity: u64,
        start: u64,
    ) -> std::result::Result<Rings, ProtoError> {
        let size = region_size(check_capacity(capacity)?)?;
        if shm.len() != size {
            return Err(ring_error("shared region has the wrong size"));
        }
        check_header(
            shm.load(offset::MAGIC),
            shm.load(offset::VERSION),
            shm.load(offset::CAPACITY),
            capacity,
        )?;
        // Our private counters start where an honest service starts them (zero); what
        // the region says they are is never read back.
        Ok(Rings {
            shm,
            capacity,
            tx: ProducerIndex::new(capacity, start)?,
            rx: ConsumerIndex::new(capacity, start)?,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn shm(&self) -> &Shm {
        &self.shm
    }

    fn copy_in(&self, area: usize, spans: &Spans, data: &[u8]) -> bool {
        let cap = self.capacity as usize;
        let (a, b) = (spans.first, spans.second);
        a.0 + a.1 <= cap
            && b.0 + b.1 <= cap
            && a.1 + b.1 <= data.len()
            && self.shm.write_at(area + a.0, &data[..a.1])
            && self.shm.write_at(area + b.0, &data[a.1..a.1 + b.1])
    }

    fn copy_out(&self, area: usize, spans: &Spans, out: &mut Vec<u8>) -> bool {
        let cap = self.capacity as usize;
        let (a, b) = (spans.first, spans.second);
        if a.0 + a.1 > cap || b.0 + b.1 > cap {
            return false;
        }
        let start = out.len();
        out.resize(start + a.1 + b.1, 0);
        self.shm.read_at(area + a.0, &mut out[start..start + a.1])
            && self.shm.read_at(area + b.0, &mut out[start + a.1..])
    }

    /// Copy as much of `data` into the request ring as fits and publish it; returns how
    /// many bytes went in (a byte stream: the rest waits for room).
    pub fn write(&mut self, data: &[u8]) -> std::result::Result<usize, ProtoError> {
        let tail = self.shm.load(offset::REQ_TAIL);
        let spans = self.tx.plan_write(tail, data.len())?;
        if spans.is_empty() {
            return Ok(0);
        }
        if !self.copy_in(request_area(self.capacity), &spans, data) {
            return Err(ring_error("request ring span out of range"));
        }
        let head = self.tx.commit(&spans);
        self.shm.store(offset::REQ_HEAD, head);
        Ok(spans.len())
    }

    /// Bytes of replies ready (checked against our tail: never more than the ring).
    pub fn available(&self) -> std::result::Result<u64, ProtoError> {
        self.rx.available(self.shm.load(offset::REP_HEAD))
    }

    /// Copy up to `limit` ready reply bytes out of the ring, then release them to the
    /// service; empty when there are none.
    pub fn read(&mut self, limit: usize) -> std::result::Result<Vec<u8>, ProtoError> {
        let head = self.shm.load(offset::REP_HEAD);
        let spans = self.rx.plan_read(head, limit)?;
        let mut out = Vec::new();
        if spans.is_empty() {
            return Ok(out);
        }
        if !self.copy_out(reply_area(self.capacity), &spans, &mut out) {
            return Err(ring_error("reply ring span out of range"));
        }
        // Released only once copied: until then the service may not reuse the bytes.
        let tail = self.rx.commit(&spans);
        self.shm.store(offset::REP_TAIL, tail);
        Ok(out)
    }

    /// Request bytes the service has not taken yet.
    pub fn unconsumed(&self) -> std::result::Result<u64, ProtoError> {
        self.tx.used(self.shm.load(offset::REQ_TAIL))
    }

    /// After publishing requests: does the service say it sleeps (and needs its
    /// doorbell)? The fence orders our head store before this load.
    pub fn peer_sleeping(&self) -> bool {
        fence(Ordering::SeqCst);
        self.shm.load(offset::REQ_SLEEP) != 0
    }

    /// Has the service executed everything we sent (a hint: a queued wait is all that
    /// is left)? A lying value only makes us spin or sleep at the wrong moment.
    pub fn all_done(&self) -> bool {
        self.shm.load(offset::REQ_DONE) == self.tx.head()
    }

    /// Say whether the service must ring us for replies (no thread is spinning).
    pub fn set_sleeping(&self, sleeping: bool) {
        self.shm.store(offset::REP_SLEEP, u64::from(sleeping));
    }

    /// Say we sleep, then re-check: the reply bytes that became ready meanwhile (read
    /// them instead of relying on a doorbell the service may not have rung).
    pub fn sleep_check(&self) -> std::result::Result<u64, ProtoError> {
        self.set_sleeping(true);
        fence(Ordering::SeqCst); // the flag store before the head load
        self.available()
    }
}

/// The rings of one session and their descriptors.
#[derive(Debug)]
pub struct ClientRing {
    pub rings: Rings,
    /// Kept open for the session's life: nothing in it is secret (frames are
    /// encrypted), and tools (`ls -l /proc/PID/fd`, the A2 ring tamperer) find it.
    memfd: OwnedFd,
    bell: OwnedFd,
    bell_ident: (u64, u64),
    /// Threads spinning on the reply ring right now (the service need not ring while
    /// one is).
    pub spinners: u32,
    /// Doorbells we rang.
    pub rung: u64,
}

impl ClientRing {
    /// Check the upgrade's descriptors (they are not authenticated: only usable) and
    /// map the region. Both descriptors are closed on error.
    pub fn attach(memfd: OwnedFd, bell: OwnedFd, capacity: u64) -> Result<ClientRing> {
        let integrity = |m: String| ClientError::Channel(ProtoError::Integrity(m));
        let size = region_size(capacity)?;
        // Checked (and mapped) before the doorbell, as before: the region's errors first.
        let shm = Shm::map_region(memfd.as_raw_fd(), size).map_err(|e| {
            integrity(match e {
                RegionError::Unusable(e) => format!("switchless descriptors are unusable: {e}"),
                RegionError::WrongSize => "switchless region has the wrong size".into(),
                RegionError::NotMemfd(_) => "switchless region is not a memfd".into(),
                RegionError::NotSealed => {
                    "switchless region is not sealed against shrinking".into()
                }
                RegionError::Map(e) => format!("switchless region cannot be mapped: {e}"),
            })
        })?;
        if !sys::is_unix_stream(bell.as_raw_fd()) {
            return Err(integrity(
                "switchless doorbell is not a Unix stream socket".into(),
            ));
        }
        sys::set_nonblocking(bell.as_raw_fd())
            .map_err(|e| integrity(format!("switchless doorbell is unusable: {e}")))?;
        let rings = Rings::attach(shm, capacity)?;
        let memfd = sys::dup_high(&memfd).map_err(|e| integrity(e.to_string()))?;
        let bell = sys::dup_high(&bell).map_err(|e| integrity(e.to_string()))?;
        let bell_ident = sys::identity(bell.as_raw_fd()).map_err(|e| integrity(e.to_string()))?;
        // Nobody spins yet: the service must ring for every reply.
        rings.set_sleeping(true);
        Ok(ClientRing {
            rings,
            memfd,
            bell,
            bell_ident,
            spinners: 0,
            rung: 0,
        })
    }

    pub fn memfd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    pub fn bell(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    /// What the fork child must let go of (`forget_in_child`).
    pub(crate) fn child_parts(&self) -> ((usize, usize), (RawFd, RawFd)) {
        (self.rings.shm.raw(), (self.memfd(), self.bell()))
    }

    /// Ring the service's doorbell (one byte, never blocking). The descriptor is
    /// checked first: a program that closed our number and reused it must not get
    /// our byte written into its file.
    pub fn ring(&mut self) -> Result<()> {
        if sys::identity(self.bell()).ok() != Some(self.bell_ident) {
            return Err(ClientError::Unavailable(
                "the switchless doorbell was closed or replaced by the program".into(),
            ));
        }
        match send_bell(self.bell()) {
            Ok(()) => {
                self.rung += 1;
                Ok(())
            }
            // Unread rings are queued: the service will wake anyway.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(ClientError::Unavailable(format!(
                "the esem service went away: {e}"
            ))),
        }
    }

    /// Empty our end of the doorbell; its EOF means the service is gone.
    pub fn drain_bell(&self) -> Result<()> {
        match sys::drain_socket(self.bell()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ClientError::Unavailable(
                "the esem service closed the session".into(),
            )),
            Err(e) => Err(ClientError::Unavailable(format!(
                "the esem service went away: {e}"
            ))),
        }
    }

    /// After the last frame (END, before the socket is closed): ring the service if it
    /// sleeps, and wait up to `timeout` for it to have executed everything we sent. The
    /// socket's EOF reaches its event loop by another way than the ring, so closing at
    /// once lets the EOF overtake the END, and the service then keeps the session (and
    /// its holdings) for a resume that never comes. A hint only: a service that lies
    /// about it just makes us wait.
    pub fn linger(&mut self, timeout: Duration) {
        let give_up = Instant::now() + timeout;
        loop {
            if self.rings.peer_sleeping() && self.ring().is_err() {
                return; // the service is gone: nothing to wait for
            }
            if self.rings.all_done() || Instant::now() >= give_up {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Publish one frame in the request ring, ringing the service if it sleeps. A full
    /// ring (the service has not drained it) is waited for, ringing, watching the
    /// socket, and handing reply bytes to `on_reply_bytes` meanwhile (so a service
    /// waiting for room in our reply ring can go on); after `FULL_RING_TIMEOUT` the
    /// session fails.
    pub fn send(
        &mut self,
        frame: &[u8],
        sock: &UnixStream,
        mut on_reply_bytes: impl FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut rest = frame;
        let n = self.rings.write(rest)?;
        rest = &rest[n..];
        let give_up = Instant::now() + FULL_RING_TIMEOUT;
        while !rest.is_empty() {
            self.ring()?;
            check_socket(sock, 1)?;
            let bytes = self.rings.read(READ_BYTES)?;
            if !bytes.is_empty() {
                on_reply_bytes(bytes)?;
            }
            let n = self.rings.write(rest)?;
            rest = &rest[n..];
            if n == 0 && Instant::now() > give_up {
                return Err(ClientError::Unavailable(format!(
                    "the esem service left the switchless request ring full for {}s",
                    FULL_RING_TIMEOUT.as_secs()
                )));
            }
        }
        if self.rings.peer_sleeping() {
            self.ring()?;
        }
        Ok(())
    }
}

/// The session socket carries nothing after the upgrade: EOF or an error means the
/// service is gone, a byte means someone is not speaking the protocol. Waits up to
/// `wait_ms` for either.
pub fn check_socket(sock: &UnixStream, wait_ms: i32) -> Result<()> {
    match sys::poll_in(sock.as_raw_fd(), wait_ms) {
        Ok(sys::Polled::Ready) => {}
        Ok(_) => return Ok(()),
        Err(e) => return Err(ClientError::Unavailable(format!("poll: {e}"))),
    }
    match sys::peek_byte(sock.as_raw_fd()) {
        Ok(Some(true)) => Err(ClientError::Channel(ring_error(
            "data on the socket of a switchless session",
        ))),
        Ok(Some(false)) => Err(ClientError::Unavailable(
            "the esem service closed the connection".into(),
        )),
        Ok(None) => Ok(()),
        Err(e) => Err(ClientError::Unavailable(format!(
            "the esem service went away: {e}"
        ))),
    }
}

/// Ask the service for switchless mode (PROTOCOL.md 15.1): on a fresh session, or on
/// a resumed one whose rings went with its old connection. `None` when it refused and
/// `mode` is `Prefer` (the session goes on over the socket, with a warning); an error
/// when it refused and `mode` is `Require`. Replies to other requests that come before
/// the upgrade's (a resumed session's) are put in `others` for their callers.
pub fn upgrade(
    sock: &UnixStream,
    session: &mut ClientSession,
    deadline: Instant,
    mode: Switchless,
    others: &mut Vec<esem_proto::Reply>,
) -> Result<Option<ClientRing>> {
    if mode == Switchless::Off {
        return Ok(None);
    }
    let unavailable = |m: String| ClientError::Unavailable(m);
    let (req_id, frame) = session.send_request(&RequestBody::Switchless, None)?;
    sys::write_all(sock.as_raw_fd(), &frame).map_err(|e| unavailable(e.to_string()))?;
    let mut fds: Vec<OwnedFd> = Vec::new(); // closed on every early return
    let mut buf = vec![0u8; READ_BYTES];
    let mut reply = None;
    while reply.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unavailable(
                "the service did not answer the switchless upgrade".into(),
            ));
        }
        match sys::poll_in(sock.as_raw_fd(), left.as_millis().clamp(1, 60_000) as i32) {
            Ok(sys::Polled::Ready) => {}
            Ok(_) => continue,
            Err(e) => return Err(unavailable(e.to_string())),
        }
        let got = sys::recv_fds_cloexec(sock.as_raw_fd(), &mut buf, UPGRADE_FDS)
            .map_err(|e| unavailable(e.to_string()))?;
        fds.extend(got.fds);
        if got.truncated {
            return Err(ClientError::Channel(ring_error(
                "descriptors of the switchless upgrade were cut off",
            )));
        }
        if got.len == 0 {
            return Err(unavailable(
                "the esem service closed the session during the switchless upgrade".into(),
            ));
        }
        for r in session.receive_data(&buf[..got.len])? {
            if r.req_id == req_id {
                reply = Some(r);
            } else {
                others.push(r);
            }
        }
    }
    let reply = reply.expect("loop ends with a reply");
    if reply.status != Status::OK {
        let reason = format!("{REFUSED}: {}", reply.message().escape_debug());
        if mode == Switchless::Require {
            return Err(unavailable(reason));
        }
        warn(&format!("{ENV} is set but {reason}; using socket mode"));
        return Ok(None);
    }
    let esem_proto::ReplyBody::Value(capacity) = reply.body else {
        return Err(ClientError::Channel(ring_error(
            "switchless reply without a capacity",
        )));
    };
    let capacity = check_capacity(u64::from(capacity))?;
    if fds.len() != UPGRADE_FDS {
        return Err(ClientError::Channel(ProtoError::Integrity(format!(
            "switchless upgrade carried {} descriptors, not {UPGRADE_FDS}",
            fds.len()
        ))));
    }
    let bell = fds.pop().expect("two descriptors");
    let memfd = fds.pop().expect("two descriptors");
    ClientRing::attach(memfd, bell, capacity).map(Some)
}
