//! One authenticated session with the service, shared by the threads of a process.
//!
//! Threads: requests are encrypted and written under one lock (so ids reach the wire
//! in order); replies are read by a **reader thread** of the session, which hands each
//! one to the thread that waits for it and rings that thread's eventfd. We chose a
//! reader thread over the Python client's leader/follower reader role because the
//! waiters then sleep in `poll` on their own eventfd, which a signal interrupts
//! (`EINTR`, needed for `sem_wait` in the preload library), while replies keep flowing
//! to every other thread; a blocked waiter never delays another thread's post, and no
//! hand-off of a role has to survive a waiter that is interrupted or cancelled. The
//! reader thread runs with every signal blocked, so the program's signals still reach
//! the program's threads. It also sends the keepalive PINGs of PROTOCOL.md 11.
//!
//! Descriptors are close-on-exec and moved to `HIGH_FD` or above, and the socket's
//! identity (device, inode) is re-checked before every write, so a program that closes
//! or reuses low descriptor numbers never gets session bytes written into its files.
//!
//! Fork: the process client (`process_client`) is checked against `getpid()` on every
//! call, and a `pthread_atfork` child handler marks the inherited session dead, closes
//! the child's copy of its socket without sending anything (a reused nonce would break
//! ChaCha20-Poly1305), and connects the child's own session at once (before a server's
//! child drops privileges, as Apache's do; a failure there is retried on first use).

use crate::error::{ClientError, Result};
use crate::paths;
use crate::sys::{self, Polled};
use esem_proto::consts::{CONNECT_TIMEOUT_SECS, KEEPALIVE_INTERVAL_SECS};
use esem_proto::{ClientSession, Reply, RequestBody, Status};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const RECV_BYTES: usize = 65536;

/// Where a waiting thread's reply goes, and how to wake it.
struct Slot {
    reply: Option<Reply>,
    wake: RawFd,
}

struct Inner {
    session: ClientSession,
    slots: HashMap<u64, Slot>,
    failure: Option<ClientError>,
    /// The keepalive PING in flight: its id and when it was sent.
    ping: Option<(u64, Instant)>,
    last_rx: Instant,
}

struct Shared {
    sock: UnixStream,
    ident: (u64, u64),
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail the session (sticky) and wake every waiter.
    fn fail_locked(&self, inner: &mut Inner, e: ClientError) -> ClientError {
        if inner.failure.is_none() {
            if let ClientError::Channel(pe) = &e {
                inner.session.fail(pe.clone());
            }
            inner.failure = Some(e);
            // Unblock the reader thread's poll and make the service end the session.
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
        for slot in inner.slots.values() {
            sys::eventfd_ring(slot.wake);
        }
        inner
            .failure
            .clone()
            .unwrap_or(ClientError::Unavailable("session failed".into()))
    }

    fn check_fd(&self) -> Result<()> {
        match sys::identity(self.sock.as_raw_fd()) {
            Ok(id) if id == self.ident => Ok(()),
            _ => Err(ClientError::Unavailable(
                "the session's descriptor was closed or replaced by the program".into(),
            )),
        }
    }

    fn send_locked(
        &self,
        inner: &mut Inner,
        body: &RequestBody,
        key: Option<&[u8]>,
    ) -> Result<u64> {
        if let Some(e) = &inner.failure {
            return Err(e.clone());
        }
        if let Err(e) = self.check_fd() {
            return Err(self.fail_locked(inner, e));
        }
        let (req_id, frame) = inner.session.send_request(body, key)?;
        if let Err(e) = (&self.sock).write_all(&frame) {
            let e = ClientError::Unavailable(format!("{}: {e}", self.path.display()));
            return Err(self.fail_locked(inner, e));
        }
        Ok(req_id)
    }

    /// The reader thread: reads, verifies and dispatches replies; keepalive.
    fn reader(self: Arc<Self>) {
        let interval = Duration::from_secs(KEEPALIVE_INTERVAL_SECS);
        let mut buf = vec![0u8; RECV_BYTES];
        let fd = self.sock.as_raw_fd();
        loop {
            if self.lock().failure.is_some() {
                return;
            }
            match sys::poll_in(fd, 1000) {
                Ok(Polled::Ready) => {}
                Ok(Polled::Timeout) | Ok(Polled::Interrupted) => {
                    let mut inner = self.lock();
                    let inner = &mut *inner;
                    if inner.session.pending() == 0 {
                        inner.last_rx = Instant::now();
                        continue;
                    }
                    match inner.ping {
                        Some((_, sent)) if sent.elapsed() >= interval => {
                            let e = ClientError::Unavailable(format!(
                                "{}: no answer to a keepalive in {}s",
                                self.path.display(),
                                KEEPALIVE_INTERVAL_SECS
                            ));
                            self.fail_locked(inner, e);
                            return;
                        }
                        None if inner.last_rx.elapsed() >= interval => {
                            if let Ok(id) = self.send_locked(inner, &RequestBody::Ping, None) {
                                inner.ping = Some((id, Instant::now()));
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                Err(e) => {
                    let mut inner = self.lock();
                    self.fail_locked(&mut inner, ClientError::Unavailable(e.to_string()));
                    return;
                }
            }
            // The program may have put a file of its own at our number: never read it.
            if let Err(e) = self.check_fd() {
                let mut inner = self.lock();
                self.fail_locked(&mut inner, e);
                return;
            }
            let n = match (&self.sock).read(&mut buf) {
                Ok(0) => {
                    let mut inner = self.lock();
                    let e = ClientError::Unavailable(format!(
                        "{}: the service closed the connection",
                        self.path.display()
                    ));
                    self.fail_locked(&mut inner, e);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let mut inner = self.lock();
                    self.fail_locked(&mut inner, ClientError::Unavailable(e.to_string()));
                    return;
                }
            };
            let mut inner = self.lock();
            let inner = &mut *inner;
            inner.last_rx = Instant::now();
            match inner.session.receive_data(&buf[..n]) {
                Ok(replies) => {
                    for reply in replies {
                        if inner.ping.is_some_and(|(id, _)| id == reply.req_id) {
                            inner.ping = None;
                        } else if let Some(slot) = inner.slots.get_mut(&reply.req_id) {
                            slot.reply = Some(reply);
                            sys::eventfd_ring(slot.wake);
                        }
                    }
                }
                Err(e) => {
                    self.fail_locked(inner, ClientError::from(e));
                    return;
                }
            }
        }
    }
}

thread_local! {
    /// This thread's doorbell, with the pid that created it (a fork child's copy of
    /// the parent's eventfd is the same file description: never shared, replaced).
    static WAKE: std::cell::RefCell<Option<(u32, OwnedFd)>> = const { std::cell::RefCell::new(None) };
}

/// This thread's doorbell eventfd (created on first use, replaced after fork): a
/// thread that sent a request may `poll` it and then call `Client::try_reply`.
pub fn my_wake_fd() -> Result<RawFd> {
    let pid = std::process::id();
    WAKE.with(|w| {
        let mut w = w.borrow_mut();
        if let Some((p, fd)) = w.as_ref() {
            if *p == pid {
                return Ok(fd.as_raw_fd());
            }
        }
        if let Some((_, old)) = w.take() {
            // The parent's eventfd, inherited: let go of our copy without using it.
            drop(old);
        }
        let fd = sys::eventfd().map_err(|e| ClientError::Unavailable(format!("eventfd: {e}")))?;
        let raw = fd.as_raw_fd();
        *w = Some((pid, fd));
        Ok(raw)
    })
}

/// A session with the service.
pub struct Client {
    shared: Arc<Shared>,
    pid: u32,
    /// Set in a fork child for the process client: its socket was closed there.
    forked: AtomicBool,
    fd: AtomicI32,
    /// The effective uid and gid at connect: the service knows the session by these
    /// (SO_PEERCRED), whatever the process becomes later.
    creds: (u32, u32),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.shared.path)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Client {
    /// Connect to the service found as `esem.paths` finds it (environment, default).
    pub fn connect() -> Result<Client> {
        let sock = paths::socket_path();
        let default = paths::is_default_location();
        let key = paths::read_pubkey(&sock, default).map_err(|e| {
            ClientError::Unavailable(format!(
                "no esem service at {} (cannot read its public key: {e})",
                sock.display()
            ))
        })?;
        Self::connect_to(&sock, &key)
    }

    /// Connect to `sock`, pinning `service_public`.
    pub fn connect_to(sock: &Path, service_public: &[u8; 32]) -> Result<Client> {
        Self::connect_to_interruptible(sock, service_public, &mut || true)
    }

    /// `connect_to`, calling `on_signal` whenever a signal interrupts the wait for the
    /// service's WELCOME: if it returns false, the half-made connection is closed
    /// (nothing kept) and `Interrupted` returned. For a binding whose signal handlers
    /// must run, and may end the connect, as its own client's do (Python's).
    pub fn connect_to_interruptible(
        sock: &Path,
        service_public: &[u8; 32],
        on_signal: &mut dyn FnMut() -> bool,
    ) -> Result<Client> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ClientError::Unavailable(format!("no esem service at {}: {e}", sock.display()))
        };
        let deadline = Instant::now() + Duration::from_secs(CONNECT_TIMEOUT_SECS);
        let creds = (sys::geteuid(), sys::getegid());
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                // EAGAIN: the listen backlog is full; a Unix socket does not queue us.
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => return Err(unavailable(&e)),
            }
        };
        // std opens sockets close-on-exec; move it high (the duplicate is too).
        let low = OwnedFd::from(stream);
        let high = sys::dup_high(&low).map_err(|e| unavailable(&e))?;
        drop(low);
        let stream = UnixStream::from(high);
        let ident = sys::identity(stream.as_raw_fd()).map_err(|e| unavailable(&e))?;
        let mut session = ClientSession::new(service_public)?;
        let hello = session.start()?;
        // A service that refuses us writes its reason and hangs up, perhaps before our
        // HELLO is out: a failed write is not the end, read the reason first.
        let _ = (&stream).write_all(&hello);
        let mut buf = [0u8; 1024];
        while !session.established() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable(&"the service did not answer the handshake"));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| unavailable(&e))?;
            let n = match (&stream).read(&mut buf) {
                Ok(0) => return Err(unavailable(&"the service closed during the handshake")),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    if on_signal() {
                        continue;
                    }
                    return Err(ClientError::Interrupted);
                }
                Err(e) => return Err(unavailable(&e)),
            };
            session.receive_data(&buf[..n]).map_err(|e| match e {
                esem_proto::Error::Refused { status, text } => ClientError::Status {
                    status,
                    message: format!("service refused the session: {text}"),
                },
                other => ClientError::from(other),
            })?;
        }
        stream.set_read_timeout(None).map_err(|e| unavailable(&e))?;
        let fd = stream.as_raw_fd();
        let shared = Arc::new(Shared {
            sock: stream,
            ident,
            path: sock.to_path_buf(),
            inner: Mutex::new(Inner {
                session,
                slots: HashMap::new(),
                failure: None,
                ping: None,
                last_rx: Instant::now(),
            }),
        });
        let reader = Arc::clone(&shared);
        SPAWNING.with(|f| f.set(true));
        let spawned = sys::with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("esem-reader".into())
                .spawn(move || reader.reader())
        });
        SPAWNING.with(|f| f.set(false));
        spawned.map_err(|e| unavailable(&e))?;
        READER_PID.store(std::process::id(), Ordering::Release);
        Ok(Client {
            shared,
            pid: std::process::id(),
            forked: AtomicBool::new(false),
            fd: AtomicI32::new(fd),
            creds,
        })
    }

    /// The 32-byte session id (the Noise handshake hash).
    /// The effective (uid, gid) this session was opened with: the service checks
    /// permissions against them, not against what the process has become since.
    pub fn credentials(&self) -> (u32, u32) {
        self.creds
    }

    /// Whether the process's effective uid and gid are still the session's.
    pub fn same_credentials(&self) -> bool {
        self.creds == (sys::geteuid(), sys::getegid())
    }

    pub fn session_id(&self) -> Option<[u8; 32]> {
        self.shared.lock().session.session_id().copied()
    }

    /// The error that ended this session, if one did.
    pub fn failure(&self) -> Option<ClientError> {
        if self.pid != std::process::id() || self.forked.load(Ordering::Acquire) {
            return Some(ClientError::Unavailable(
                "esem session belongs to the parent process".into(),
            ));
        }
        self.shared.lock().failure.clone()
    }

    fn check_pid(&self) -> Result<()> {
        if self.pid != std::process::id() || self.forked.load(Ordering::Acquire) {
            return Err(ClientError::Unavailable(
                "esem session belongs to the parent process".into(),
            ));
        }
        Ok(())
    }

    /// Send a request; its reply is kept for `wait_reply`. Returns the request id.
    pub fn send(&self, body: &RequestBody, key: Option<&[u8]>) -> Result<u64> {
        self.check_pid()?;
        let wake = my_wake_fd()?;
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let id = self.shared.send_locked(inner, body, key)?;
        inner.slots.insert(id, Slot { reply: None, wake });
        Ok(id)
    }

    /// The reply to `req_id` if it has arrived (`None` while pending), without
    /// blocking; drains this thread's doorbell first. For callers that sleep in a
    /// `poll` of their own on `my_wake_fd()` (the preload library's cancellable waits).
    pub fn try_reply(&self, req_id: u64) -> Option<Result<Reply>> {
        if let Err(e) = self.check_pid() {
            return Some(Err(e));
        }
        if let Ok(fd) = my_wake_fd() {
            sys::eventfd_drain(fd);
        }
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let Some(slot) = inner.slots.get_mut(&req_id) else {
            return Some(Err(ClientError::Invalid(format!(
                "request {req_id} is not pending"
            ))));
        };
        if let Some(reply) = slot.reply.take() {
            inner.slots.remove(&req_id);
            return Some(Ok(reply));
        }
        if let Some(e) = inner.failure.clone() {
            inner.slots.remove(&req_id);
            return Some(Err(e));
        }
        None
    }

    /// Block until the reply to `req_id` arrives. With `interruptible`, a signal
    /// delivered to this thread returns `Interrupted` and the request stays pending
    /// (wait again to get its reply).
    pub fn wait_reply(&self, req_id: u64, interruptible: bool) -> Result<Reply> {
        self.check_pid()?;
        loop {
            let wake = {
                let mut guard = self.shared.lock();
                let inner = &mut *guard;
                let Some(slot) = inner.slots.get_mut(&req_id) else {
                    return Err(ClientError::Invalid(format!(
                        "request {req_id} is not pending"
                    )));
                };
                if let Some(reply) = slot.reply.take() {
                    inner.slots.remove(&req_id);
                    return Ok(reply);
                }
                let wake = slot.wake;
                if let Some(e) = inner.failure.clone() {
                    inner.slots.remove(&req_id);
                    return Err(e);
                }
                wake
            };
            match sys::poll_in(wake, -1) {
                Ok(Polled::Interrupted) if interruptible => return Err(ClientError::Interrupted),
                Ok(_) => sys::eventfd_drain(wake),
                Err(e) => return Err(ClientError::Unavailable(format!("poll: {e}"))),
            }
        }
    }

    /// Send and wait; a refusal is `ClientError::Status`.
    pub fn call(&self, body: &RequestBody, key: Option<&[u8]>) -> Result<Reply> {
        let id = self.send(body, key)?;
        let reply = self.wait_reply(id, false)?;
        if reply.status != Status::OK {
            return Err(ClientError::Status {
                status: reply.status,
                message: reply.message(),
            });
        }
        Ok(reply)
    }

    /// End the session now (as dropping the client does): every waiter wakes with the
    /// failure and the service closes the session's handles. For owners that cannot
    /// drop the client while other threads may still hold it (a language binding).
    pub fn close(&self) {
        if self.pid == std::process::id() && !self.forked.load(Ordering::Acquire) {
            let mut inner = self.shared.lock();
            self.shared
                .fail_locked(&mut inner, ClientError::Unavailable("client closed".into()));
        }
    }

    /// In a fork child, let go of a client the parent made: close the child's copy of
    /// the socket without sending or reading anything, and fail every later call. The
    /// caller must then never drop it in the child (`mem::forget`): its lock may be held
    /// by a thread that does not exist here. For clients other than the process client
    /// (whose own atfork handler does this), e.g. ones a language binding owns.
    pub fn abandon_in_child(&self) {
        if self.pid != std::process::id() {
            self.forked_away();
        }
    }

    /// The fork-child handler's part: close our copy of the socket without sending.
    fn forked_away(&self) {
        self.forked.store(true, Ordering::Release);
        sys::close_raw(self.fd.swap(-1, Ordering::AcqRel));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // In a fork child the lock may be held by a thread that no longer exists: an
        // inherited client is left alone (its descriptor stays open in the child).
        if self.pid == std::process::id() {
            let mut inner = self.shared.lock();
            self.shared
                .fail_locked(&mut inner, ClientError::Unavailable("client closed".into()));
        }
    }
}

// ------------------------------------------------------------ the process client

/// The process client. Clients put here are leaked on purpose (replaced only after a
/// fork or a failure, a few hundred bytes each): a pointer read from here stays valid
/// whatever other threads, or a fork, do meanwhile.
static CURRENT: AtomicPtr<Client> = AtomicPtr::new(std::ptr::null_mut());
/// A spin lock around creation, not a Mutex: the fork-child handler must be able to
/// reset it when another thread held it at fork time.
static CREATING: AtomicBool = AtomicBool::new(false);
static ATFORK: std::sync::Once = std::sync::Once::new();

fn current() -> Option<&'static Client> {
    let p = CURRENT.load(Ordering::Acquire);
    // SAFETY: every non-null pointer stored in CURRENT comes from `Box::leak` and is
    // never freed, so it is valid for 'static.
    unsafe { p.as_ref() }
}

fn usable(c: &Client) -> bool {
    c.pid == std::process::id() && c.failure().is_none()
}

/// This process's client: connected on first use, replaced after `fork` and after the
/// session failed.
pub fn process_client() -> Result<&'static Client> {
    ATFORK.call_once(|| {
        let _ = sys::at_fork_child(after_fork_in_child);
    });
    if let Some(c) = current().filter(|c| usable(c)) {
        return Ok(c);
    }
    // Another thread is connecting (up to CONNECT_TIMEOUT): wait without burning a CPU.
    let mut spins = 0u32;
    while CREATING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let out = match current().filter(|c| usable(c)) {
        Some(c) => Ok(c),
        None => Client::connect().map(|c| {
            let c: &'static Client = Box::leak(Box::new(c));
            CURRENT.store(c as *const Client as *mut Client, Ordering::Release);
            c
        }),
    };
    CREATING.store(false, Ordering::Release);
    out
}

thread_local! {
    /// Set while this thread creates the client's reader thread (const, no destructor).
    static SPAWNING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The process that last started a reader thread (a fork child has none until it
/// connects: the thread is not copied).
static READER_PID: AtomicU32 = AtomicU32::new(0);

/// Whether this process has a reader thread of the client (which never ends, so it
/// would keep the process alive after the program's last thread).
pub fn has_own_thread() -> bool {
    READER_PID.load(Ordering::Acquire) == std::process::id()
}

/// Whether the calling thread is inside the client, creating the client's own reader
/// thread: a `pthread_create` interposer (the preload library's) tells the client's
/// threads from the program's with it.
pub fn spawning_own_thread() -> bool {
    SPAWNING.with(std::cell::Cell::get)
}

/// Whether the fork-child handler connects the child's session at once.
static RECONNECT_AT_FORK: AtomicBool = AtomicBool::new(true);

/// Choose whether a fork child connects its own session at once (default) or on its
/// first call.
pub fn set_reconnect_at_fork(on: bool) {
    RECONNECT_AT_FORK.store(on, Ordering::Release);
}

/// Why this process's session could not be opened in the fork handler, if it could not
/// (a leaked box: written only there, where the child is single-threaded, and read
/// without a lock, so a fork can never leave it locked). The first call then connects,
/// but a server's child may have changed uid meanwhile (Apache's drop to www-data), and
/// a session of the new uid cannot attach what the process inherited: that refusal is
/// reported as this cause (`fork_connect_failure`), not as a bare "no such handle".
static FORK_FAILURE: AtomicPtr<(Option<Status>, String)> = AtomicPtr::new(std::ptr::null_mut());

/// The reason the fork-time session of this process was refused or failed, if it was.
pub(crate) fn fork_connect_failure() -> Option<ClientError> {
    let p = FORK_FAILURE.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: a leaked, never freed box, written before the store above was published.
    let (status, text) = unsafe { &*p };
    let message = format!(
        "this process's session could not be opened when it was forked \
                           ({text}), so it cannot reach the semaphores it inherited"
    );
    Some(match status {
        Some(status) => ClientError::Status {
            status: *status,
            message,
        },
        None => ClientError::Unavailable(message),
    })
}

extern "C" fn after_fork_in_child() {
    CREATING.store(false, Ordering::Release);
    FORK_FAILURE.store(std::ptr::null_mut(), Ordering::Release); // the parent's, if any
    let Some(c) = current() else { return };
    c.forked_away();
    CURRENT.store(std::ptr::null_mut(), Ordering::Release);
    if RECONNECT_AT_FORK.load(Ordering::Acquire) {
        // glibc makes malloc usable in the child and our locks are reset, so a
        // connect here works; if it fails, the first call connects instead.
        match Client::connect() {
            Ok(c) => {
                let c: &'static Client = Box::leak(Box::new(c));
                CURRENT.store(c as *const Client as *mut Client, Ordering::Release);
            }
            Err(e) => {
                let why = Box::leak(Box::new((e.status(), e.to_string())));
                FORK_FAILURE.store(why, Ordering::Release);
            }
        }
    }
}

/// A descriptor number is the session's (for tests that check `HIGH_FD`).
pub fn session_fd(c: &Client) -> RawFd {
    c.fd.load(Ordering::Acquire)
}
