//! One authenticated session with the service, shared by the threads of a process.
//!
//! Threads: requests are encrypted and written under one lock (so ids reach the wire
//! in order). Replies to a switchless session are read by the session's **reader
//! thread**; on a socket session the common case (one thread, one request in flight)
//! is served by the calling thread itself: send, then read the reply, three system
//! calls per operation (`fstat`, `send`, `recv`) and no thread switch.
//!
//! Who reads the socket (`Role`, changed only under the session lock, so exactly one
//! thread reads at any time):
//! - `Idle`: nobody. A thread that waits for a reply and finds the socket `Idle`, with
//!   nobody else asleep for one, no PING out and the session plainly open, takes it
//!   (`Caller`) and reads until its own reply is in; every reply it reads goes to its
//!   slot by request id (the session verifies and orders them), others' threads are
//!   woken through their eventfds. It then gives the socket back: `Idle`, or `Thread`
//!   if somebody else sleeps for a reply (or a PING is out).
//! - `Thread`: the reader thread reads (as it always did: several waiters, a thread
//!   sleeping in a `poll` of its own after `try_reply`, which is how the preload
//!   library's cancellable waits block, a resume in progress). It goes back to `Idle`
//!   once nobody sleeps for a reply.
//! - Every other waiter sleeps in `poll` on its own eventfd (so a signal interrupts it:
//!   `EINTR`, needed for `sem_wait`), marked `parked`; the socket is never `Idle` while
//!   a thread is parked without its reply, since every change to `Idle` checks for one.
//!
//! While it does not read, the reader thread sleeps in `poll` on its kick eventfd and
//! on the socket with `POLLRDHUP` only: data does not wake it (the kernel filters the
//! wake-up by the events asked for), a hang-up does, so a lost connection is noticed
//! while idle. A caller that meets the loss (EOF, reset) hands the socket to the reader
//! thread and waits like the others; only the reader thread resumes. It also wakes once
//! a second for the keepalive PINGs of PROTOCOL.md 11 and, as a safety net, takes the
//! socket if requests are out and nobody reads for them. A signal that interrupts a
//! reading caller's `interruptible` wait (the caller polls the socket before reading,
//! since a handler with `SA_RESTART` would restart a blocking read) gives the socket
//! back; the request stays pending and its reply goes to its slot. A panic in a
//! reading caller gives the socket back too (`Reading`'s drop). The reader thread runs
//! with every signal blocked, so the program's signals still reach the program's
//! threads.
//!
//! Descriptors are close-on-exec and moved to `HIGH_FD` or above, and the socket's
//! identity (device, inode) is re-checked (`fstat`) before every write and before
//! every read but the one that follows the caller's own write, so a program that
//! closes or reuses low descriptor numbers never gets session bytes written into its
//! files, nor its bytes read as ours.
//!
//! Fork: a client is checked against the process id on every call, read from a
//! `MADV_WIPEONFORK` page (`sys::pid`: no `getpid` system call per call; the kernel
//! zeroes the page in any fork child, `pthread_atfork` or not), and a `pthread_atfork`
//! child handler marks the inherited session dead, closes
//! the child's copy of its socket without sending anything (a reused nonce would break
//! ChaCha20-Poly1305), and connects the child's own session at once (before a server's
//! child drops privileges, as Apache's do; a failure there is retried on first use).
//!
//! Crash safety (PROTOCOL.md 16, policy in `resume.rs`): when the connection is lost
//! (the service exited, crashed or restarted) the reader thread reconnects with a
//! backoff for up to `ESEM_RESUME_TIMEOUT`, RESUMEs the session, and the service's
//! answers (replayed, re-sent or still queued requests) reach the waiting threads as
//! usual: blocked callers see latency, not an error. Meanwhile requests are queued in
//! the session. A refused resume, a timeout, or any integrity or protocol error fails
//! the session as before. Closing the client, or the process's exit, sends END.

use crate::error::{ClientError, Result};
use crate::paths;
use crate::resume::{self, Backoff, KeySource};
use crate::ring::{self, ClientRing, Switchless};
use crate::sys::{self, Polled};
use esem_proto::consts::{CONNECT_TIMEOUT_SECS, KEEPALIVE_INTERVAL_SECS};
use esem_proto::{ClientSession, Reply, RequestBody, Status};
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const RECV_BYTES: usize = 65536;

/// Where a waiting thread's reply goes, and how to wake it.
struct Slot {
    reply: Option<Reply>,
    wake: RawFd,
    /// Its thread is spinning on the reply ring (switchless): no eventfd ring needed.
    spinning: bool,
    /// Its thread reads the socket itself (`Role::Caller`): no eventfd ring needed.
    reading: bool,
    /// Its thread sleeps until its eventfd rings (in `wait_reply`, or in a `poll` of its
    /// own after `try_reply`): somebody must read the socket for it.
    parked: bool,
    /// Its request was just written on the socket after a check of the descriptor: the
    /// first read its thread makes for it needs no check of its own (cleared then).
    checked: bool,
}

/// Who reads the session socket (socket mode; see "Who reads the socket" above).
/// Changed only under the session lock: `Idle` -> `Caller` by a waiting thread,
/// `Idle` -> `Thread` by the reader thread or a `try_reply`, `Caller` -> `Idle` or
/// `Thread` by that caller, `Thread` -> `Idle` by the reader thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Nobody reads; the reader thread waits for a hang-up or a kick only.
    Idle,
    /// One calling thread reads, for its own reply (and delivers any others').
    Caller,
    /// The reader thread reads (and resumes the session when the connection is lost).
    Thread,
}

/// The current connection: the socket, shared by the writers (under the lock) and the
/// reader thread, and its identity (device, inode), checked before each use.
struct Conn {
    sock: Arc<UnixStream>,
    ident: (u64, u64),
}

struct Inner {
    session: ClientSession,
    slots: HashMap<u64, Slot>,
    failure: Option<ClientError>,
    /// The keepalive PING in flight: its id and when it was sent.
    ping: Option<(u64, Instant)>,
    last_rx: Instant,
    /// `None` while the reader thread reconnects (requests are queued meanwhile).
    conn: Option<Conn>,
    /// The switchless rings (PROTOCOL.md 15) of the current connection, when it was
    /// upgraded. A lost connection takes its rings with it: the session resumes over
    /// the socket (the new service has no rings for it).
    ring: Option<ClientRing>,
    /// Counts the rings the session has had, so that a spinner notices its ring was
    /// replaced (lost, then upgraded again) between two of its turns.
    ring_gen: u64,
    /// The session lost its rings with its connection: upgrade again once resumed.
    reupgrade: bool,
    /// Who reads the socket now.
    role: Role,
}

struct Shared {
    path: PathBuf,
    /// The pinned service key and where it came from (re-checked on reconnect).
    key: [u8; 32],
    key_source: KeySource,
    /// `ESEM_RESUME_TIMEOUT` at connect; `None`: resumption off.
    resume_timeout: Option<Duration>,
    /// The transport asked for at connect (the reader thread never reads the
    /// environment): what a resumed session that had rings asks for again.
    mode: Switchless,
    /// The current connection's descriptor (for the fork-child handler), -1 if none.
    fd: AtomicI32,
    /// The current rings' mapping (address, length) and descriptors (memfd, bell), for
    /// the fork-child handler, which must let go of them without the lock (0 and -1:
    /// none). Cleared before the rings are dropped, set after they are mapped, so a
    /// child never unmaps or closes what is no longer ours.
    ring_map: [AtomicUsize; 2],
    ring_fds: [AtomicI32; 2],
    /// The reader thread's eventfd: rung when it must take the socket over (`Role::Thread`)
    /// from a caller or a `try_reply`. -1 once closed (in a fork child).
    kick: AtomicI32,
    inner: Mutex<Inner>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        sys::close_raw(self.kick.swap(-1, Ordering::AcqRel));
    }
}

/// How the reader thread's turn on one transport ended.
enum Turn {
    /// The connection is gone (EOF, reset): resume.
    Lost(String),
    /// The session failed or was closed: the reader is done.
    Failed,
    /// The resumed session is on the rings again: read them.
    Upgraded,
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
            if let Some(c) = &inner.conn {
                let _ = c.sock.shutdown(std::net::Shutdown::Both);
            }
        }
        for slot in inner.slots.values() {
            sys::eventfd_ring(slot.wake);
        }
        inner
            .failure
            .clone()
            .unwrap_or(ClientError::Unavailable("session failed".into()))
    }

    /// Whether the reader thread must read the socket: somebody sleeps for a reply, a
    /// PING is out, or the session is not (or no longer) plainly open on its socket.
    fn thread_needed_locked(inner: &Inner) -> bool {
        inner.ping.is_some()
            || inner.reupgrade
            || inner.failure.is_some()
            || inner.conn.is_none()
            || inner.ring.is_some()
            || !inner.session.established()
            || inner.slots.values().any(|s| s.parked && s.reply.is_none())
    }

    /// Hand the socket to the reader thread: `Role::Thread`, and ring its eventfd.
    fn kick_locked(&self, inner: &mut Inner) {
        if inner.role != Role::Thread {
            inner.role = Role::Thread;
            sys::eventfd_ring(self.kick.load(Ordering::Acquire));
        }
    }

    /// The calling thread that read for `req_id` stops reading: nobody reads if nobody
    /// needs it, else the reader thread takes over.
    fn release_locked(&self, inner: &mut Inner, req_id: u64) {
        if let Some(slot) = inner.slots.get_mut(&req_id) {
            slot.reading = false;
        }
        if inner.role != Role::Caller {
            return;
        }
        if Self::thread_needed_locked(inner) {
            self.kick_locked(inner);
        } else {
            inner.role = Role::Idle;
        }
    }

    fn check_fd(conn: &Conn) -> Result<()> {
        match sys::identity(conn.sock.as_raw_fd()) {
            Ok(id) if id == conn.ident => Ok(()),
            _ => Err(ClientError::Unavailable(
                "the session's descriptor was closed or replaced by the program".into(),
            )),
        }
    }

    /// Take `ring` as the session's rings, published for the fork-child handler.
    fn install_ring_locked(&self, inner: &mut Inner, ring: ClientRing) {
        let ((addr, len), (memfd, bell)) = ring.child_parts();
        inner.ring = Some(ring);
        inner.ring_gen += 1;
        self.ring_map[0].store(addr, Ordering::Release);
        self.ring_map[1].store(len, Ordering::Release);
        self.ring_fds[0].store(memfd, Ordering::Release);
        self.ring_fds[1].store(bell, Ordering::Release);
    }

    /// Let go of the rings (unmap, close): the connection they belonged to is gone.
    fn drop_ring_locked(&self, inner: &mut Inner) {
        if inner.ring.is_none() {
            return;
        }
        self.ring_map[1].store(0, Ordering::Release);
        self.ring_map[0].store(0, Ordering::Release);
        self.ring_fds[0].store(-1, Ordering::Release);
        self.ring_fds[1].store(-1, Ordering::Release);
        inner.ring = None;
        inner.ring_gen += 1;
    }

    /// Write frames on the current connection: its rings if it has them, else its
    /// socket. A lost connection is not an error here: the requests stay pending, the
    /// reader thread sees the loss and resumes.
    fn write_locked(&self, inner: &mut Inner, frame: &[u8]) -> Result<()> {
        if frame.is_empty() {
            return Ok(());
        }
        if inner.ring.is_some() {
            return match self.ring_send_locked(inner, frame) {
                Ok(()) => Ok(()),
                Err(ClientError::Unavailable(_))
                    if inner.session.resumable() && self.service_gone_locked(inner) =>
                {
                    // The service died under the rings: the reader sees its EOF and
                    // resumes; the session re-sends this request over the socket.
                    Ok(())
                }
                Err(e) => Err(self.fail_locked(inner, e)),
            };
        }
        let Some(conn) = &inner.conn else {
            return Ok(()); // reconnecting: the session re-sends it after the RESUME
        };
        if let Err(e) = Self::check_fd(conn) {
            return Err(self.fail_locked(inner, e));
        }
        match sys::send_all(&conn.sock, frame) {
            Ok(()) => Ok(()),
            Err(e) if resume::is_connection_loss(&e) && inner.session.resumable() => {
                // The peer is gone, so the reader's poll sees the hang-up by itself,
                // after it has read every reply the service wrote before it went (no
                // shutdown here: those replies are what makes a resume exact).
                Ok(())
            }
            Err(e) => {
                let e = ClientError::Unavailable(format!("{}: {e}", self.path.display()));
                Err(self.fail_locked(inner, e))
            }
        }
    }

    /// A switchless write failed as unavailable: is it the service that went away (its
    /// end of the session socket closed), rather than a local fault? A service that
    /// died closes its doorbell and its socket within moments of each other: wait a
    /// little for the second.
    fn service_gone_locked(&self, inner: &Inner) -> bool {
        let Some(conn) = &inner.conn else {
            return true;
        };
        Self::check_fd(conn).is_ok()
            && matches!(
                ring::check_socket(&conn.sock, 100),
                Err(ClientError::Unavailable(_))
            )
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
        // The descriptor check is `write_locked`'s, once per request on the socket (none
        // in switchless mode, where nothing is written to the socket).
        let (req_id, frame) = inner.session.send_request(body, key)?;
        self.write_locked(inner, &frame)?;
        Ok(req_id)
    }

    /// Best effort END (the client is closing, or the process exiting): the service
    /// ends the session at once instead of keeping it for a resume. On the rings it
    /// goes in only if it fits at once (never waits for room: this may run at exit),
    /// and the close waits a moment for the service to have taken it (`linger`).
    fn end_locked(&self, inner: &mut Inner) {
        if inner.failure.is_some() || inner.conn.is_none() || !inner.session.established() {
            return;
        }
        let Ok((_, frame)) = inner.session.send_request(&RequestBody::End, None) else {
            return;
        };
        if let Some(ring) = inner.ring.as_mut() {
            if ring.rings.write(&frame).is_ok_and(|n| n == frame.len()) {
                ring.linger(ring::END_LINGER);
            }
            return;
        }
        if let Some(conn) = &inner.conn {
            if Self::check_fd(conn).is_ok() {
                let _ = sys::send_all(&conn.sock, &frame);
            }
        }
    }

    /// The connection is gone: reconnect and RESUME, or fail the session. Returns the
    /// new socket for the reader, or `None` once the session has failed.
    fn connection_lost(&self, why: String) -> Option<Arc<UnixStream>> {
        let unavailable =
            |m: &str| ClientError::Unavailable(format!("{}: {m}", self.path.display()));
        let timeout = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            if inner.failure.is_some() {
                return None;
            }
            // The reader thread owns the session until it is resumed (a caller that met
            // the loss has handed the socket over already).
            inner.role = Role::Thread;
            // Replies the service published in the reply ring before it went are
            // still in the mapping: take them (the RESUME then awaits fewer).
            if inner.ring.is_some() && self.consume_locked(inner).is_err() {
                return None;
            }
            let timeout = match self.resume_timeout {
                Some(t) if inner.session.resumable() => t,
                _ => {
                    self.fail_locked(inner, unavailable(&why));
                    return None;
                }
            };
            if inner.ring.is_some() && self.mode != Switchless::Off {
                inner.reupgrade = true;
            }
            if let Err(e) = self.detach_locked(inner) {
                self.fail_locked(inner, e);
                return None;
            }
            timeout
        };
        let mut backoff = Backoff::new(timeout);
        loop {
            if self.lock().failure.is_some() {
                return None; // closed meanwhile
            }
            let last = match self.reconnect_once(&backoff) {
                Ok(sock) => return Some(sock),
                Err(Attempt::Fatal(e)) => {
                    let mut inner = self.lock();
                    self.fail_locked(&mut inner, e);
                    return None;
                }
                Err(Attempt::Retry(m)) => m,
            };
            if !backoff.pause() {
                let mut inner = self.lock();
                let e = unavailable(&format!(
                    "{why}, and the session could not be resumed within {:.1}s ({last})",
                    timeout.as_secs_f64()
                ));
                self.fail_locked(&mut inner, e);
                return None;
            }
        }
    }

    /// Keep the session for a RESUME and let go of the dead connection and its rings.
    fn detach_locked(&self, inner: &mut Inner) -> Result<()> {
        inner.session.detach()?;
        for slot in inner.slots.values_mut() {
            slot.checked = false; // that check was of the connection now gone
        }
        self.drop_ring_locked(inner);
        if let Some(c) = inner.conn.take() {
            let _ = c.sock.shutdown(std::net::Shutdown::Both);
        }
        self.fd.store(-1, Ordering::Release);
        inner.ping = None;
        Ok(())
    }

    /// One reconnection: key re-check, connect, handshake, RESUME written.
    fn reconnect_once(&self, backoff: &Backoff) -> std::result::Result<Arc<UnixStream>, Attempt> {
        match resume::recheck_key(&self.path, self.key_source, &self.key) {
            Ok(()) => {}
            Err(None) => return Err(Attempt::Retry("the service's key cannot be read".into())),
            Err(Some(e)) => return Err(Attempt::Fatal(e)),
        }
        let deadline = backoff
            .deadline()
            .min(Instant::now() + Duration::from_secs(CONNECT_TIMEOUT_SECS));
        let (stream, ident, fresh) = match handshake(&self.path, &self.key, deadline, &mut || true)
        {
            Ok(x) => x,
            // Not there yet (ENOENT, ECONNREFUSED), or gone again: try again.
            Err(ClientError::Unavailable(m)) => return Err(Attempt::Retry(m)),
            Err(e) => return Err(Attempt::Fatal(e)),
        };
        let sock = Arc::new(stream);
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(e) = &inner.failure {
            return Err(Attempt::Fatal(e.clone()));
        }
        inner
            .session
            .resume_over(fresh)
            .map_err(|e| Attempt::Fatal(e.into()))?;
        let out = inner.session.take_outgoing();
        inner.conn = Some(Conn {
            sock: Arc::clone(&sock),
            ident,
        });
        self.fd.store(sock.as_raw_fd(), Ordering::Release);
        inner.last_rx = Instant::now();
        match sys::send_all(&sock, &out) {
            Ok(()) => Ok(sock),
            Err(e) if resume::is_connection_loss(&e) => {
                self.detach_locked(inner).map_err(Attempt::Fatal)?;
                Err(Attempt::Retry(e.to_string()))
            }
            Err(e) => Err(Attempt::Fatal(ClientError::Unavailable(e.to_string()))),
        }
    }

    /// The reader thread: reads, verifies and dispatches replies (from the socket, or
    /// the rings once upgraded); keepalive; resumes the session when the connection
    /// is lost (over the socket, then on new rings if it had them).
    fn reader(self: Arc<Self>) {
        let Some(mut sock) = self.lock().conn.as_ref().map(|c| Arc::clone(&c.sock)) else {
            return;
        };
        loop {
            let on_rings = self.lock().ring.is_some();
            let turn = if on_rings {
                self.ring_reader(&sock)
            } else {
                self.socket_reader(&sock)
            };
            match turn {
                Turn::Upgraded => {}
                Turn::Failed => return,
                Turn::Lost(why) => match self.connection_lost(why) {
                    Some(new) => sock = new,
                    None => return,
                },
            }
        }
    }

    /// The reader on a socket session, until its connection is lost, the session
    /// fails, or the resumed session is upgraded again.
    fn socket_reader(&self, sock: &Arc<UnixStream>) -> Turn {
        let interval = Duration::from_secs(KEEPALIVE_INTERVAL_SECS);
        let mut buf = vec![0u8; RECV_BYTES];
        // A hang-up seen while a caller reads: that caller meets it and hands over.
        let mut hup_seen = false;
        // A hang-up seen while nobody read: keep reading until the EOF, which ends the
        // turn (nobody may need the thread otherwise, yet the loss must be met).
        let mut hold = false;
        loop {
            let reading = {
                let mut inner = self.lock();
                if inner.failure.is_some() {
                    return Turn::Failed;
                }
                if inner.role == Role::Thread && !hold && !Self::thread_needed_locked(&inner) {
                    inner.role = Role::Idle;
                }
                inner.role == Role::Thread
            };
            if !reading {
                if let Some(turn) = self.standby(sock, &mut hup_seen, &mut hold) {
                    return turn;
                }
                continue;
            }
            hup_seen = false;
            match sys::poll_in(sock.as_raw_fd(), 1000) {
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
                            return Turn::Failed;
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
                    return Turn::Failed;
                }
            }
            // The program may have put a file of its own at our number: never read it.
            {
                let mut inner = self.lock();
                let check = match &inner.conn {
                    Some(c) if Arc::ptr_eq(&c.sock, sock) => Self::check_fd(c),
                    _ => Err(ClientError::Unavailable("connection replaced".into())),
                };
                if let Err(e) = check {
                    self.fail_locked(&mut inner, e);
                    return Turn::Failed;
                }
            }
            let lost = match (&**sock).read(&mut buf) {
                Ok(0) => Some("the service closed the connection".to_string()),
                Ok(n) => match self.received(sock, &buf[..n]) {
                    Turn::Lost(why) => Some(why),
                    Turn::Failed => return Turn::Failed,
                    Turn::Upgraded if self.lock().ring.is_some() => return Turn::Upgraded,
                    Turn::Upgraded => None,
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                Err(e) if resume::is_connection_loss(&e) => Some(e.to_string()),
                Err(e) => {
                    let mut inner = self.lock();
                    self.fail_locked(&mut inner, ClientError::Unavailable(e.to_string()));
                    return Turn::Failed;
                }
            };
            if let Some(why) = lost {
                return Turn::Lost(why);
            }
        }
    }

    /// The reader thread while nobody or a caller reads the socket: it sleeps until it is
    /// kicked (`Role::Thread`), the connection hangs up (data does not wake it), or a
    /// second passes (the keepalive, and requests that nobody waits on yet). `Some`
    /// once the session has failed.
    fn standby(&self, sock: &UnixStream, hup_seen: &mut bool, hold: &mut bool) -> Option<Turn> {
        let kick = self.kick.load(Ordering::Acquire);
        let fd = if *hup_seen { -1 } else { sock.as_raw_fd() };
        let polled = sys::poll_kick_or_hangup(kick, fd, 1000);
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.failure.is_some() {
            return Some(Turn::Failed);
        }
        let (kicked, hup) = match polled {
            Ok(x) => x,
            Err(e) => {
                self.fail_locked(inner, ClientError::Unavailable(e.to_string()));
                return Some(Turn::Failed);
            }
        };
        if kicked {
            sys::eventfd_drain(kick);
        }
        if hup {
            if inner.role == Role::Idle {
                inner.role = Role::Thread; // read what is left, meet the EOF, resume
                *hold = true;
            } else {
                *hup_seen = true; // the reading caller meets it; poll the kick only
            }
        } else if !kicked {
            // A quiet second: the keepalive (requests out and nothing heard: a PING,
            // which the thread reads for if nobody else reads); and a safety net, as
            // nobody may sleep for a reply while nobody reads.
            if !self.keepalive_locked(inner) {
                return Some(Turn::Failed);
            }
            if inner.role == Role::Idle && Self::thread_needed_locked(inner) {
                inner.role = Role::Thread;
            }
        }
        None
    }

    /// Verify and dispatch what the service sent; then write what the session queued
    /// (the re-sends after a RESUME), under the same lock so that no other frame can
    /// take a nonce between; then, if the session has just resumed after losing its
    /// rings, upgrade again. `Upgraded` means the turn went on normally (on the rings
    /// if `inner.ring` is now set).
    fn received(&self, sock: &UnixStream, data: &[u8]) -> Turn {
        let mut inner = self.lock();
        self.received_locked(&mut inner, sock, data)
    }

    fn received_locked(&self, inner: &mut Inner, sock: &UnixStream, data: &[u8]) -> Turn {
        inner.last_rx = Instant::now();
        match inner.session.receive_data(data) {
            Ok(replies) => {
                Self::deliver_locked(inner, replies);
                let out = inner.session.take_outgoing();
                if self.write_locked(inner, &out).is_err() {
                    return Turn::Failed;
                }
            }
            Err(e) => {
                self.fail_locked(inner, ClientError::from(e));
                return Turn::Failed;
            }
        }
        if inner.reupgrade && inner.session.established() && inner.ring.is_none() {
            inner.reupgrade = false;
            if let Err(e) = self.upgrade_again_locked(inner, sock) {
                self.fail_locked(inner, e);
                return Turn::Failed;
            }
        }
        Turn::Upgraded
    }

    /// The session resumed over the socket after losing its rings: ask the new service
    /// for rings again (PROTOCOL.md 15.1), under the lock, so that nothing else is sent
    /// until the SWITCHLESS reply; replies that come before it are delivered. A
    /// refusal leaves the session on the socket (with `ESEM_SWITCHLESS=1`, warned)
    /// or fails it (required). Any failure here fails the session: a connection lost
    /// in the middle of the upgrade cannot be resumed exactly (the SWITCHLESS reply's
    /// descriptors cannot be re-sent).
    fn upgrade_again_locked(&self, inner: &mut Inner, sock: &UnixStream) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(CONNECT_TIMEOUT_SECS);
        let mut others = Vec::new();
        let upgraded = ring::upgrade(sock, &mut inner.session, deadline, self.mode, &mut others);
        inner.last_rx = Instant::now();
        Self::deliver_locked(inner, others);
        if let Some(ring) = upgraded? {
            self.install_ring_locked(inner, ring);
        }
        Ok(())
    }

    /// Hand each reply to the thread waiting for it (ringing its eventfd unless it is
    /// spinning for it), or close the keepalive PING.
    fn deliver_locked(inner: &mut Inner, replies: Vec<Reply>) {
        Self::deliver(&mut inner.slots, &mut inner.ping, replies)
    }

    fn deliver(
        slots: &mut HashMap<u64, Slot>,
        ping: &mut Option<(u64, Instant)>,
        replies: Vec<Reply>,
    ) {
        for reply in replies {
            if ping.is_some_and(|(id, _)| id == reply.req_id) {
                *ping = None;
            } else if let Some(slot) = slots.get_mut(&reply.req_id) {
                slot.reply = Some(reply);
                if !slot.spinning && !slot.reading {
                    sys::eventfd_ring(slot.wake);
                }
            }
        }
    }

    /// Switchless: publish one frame in the request ring (under the lock: one
    /// producer), taking replies out meanwhile if the ring is full.
    fn ring_send_locked(&self, inner: &mut Inner, frame: &[u8]) -> Result<()> {
        let Inner {
            ring,
            session,
            slots,
            ping,
            last_rx,
            conn,
            ..
        } = inner;
        let ring = ring.as_mut().expect("ring mode");
        let Some(conn) = conn.as_ref() else {
            return Err(ClientError::Unavailable("the connection is gone".into()));
        };
        let mut delivered = Vec::new();
        ring.send(frame, &conn.sock, |bytes| {
            *last_rx = Instant::now();
            delivered.extend(session.receive_data(&bytes)?);
            Ok(())
        })?;
        Self::deliver(slots, ping, delivered);
        Ok(())
    }

    /// Switchless: take every reply the ring holds, verify and deliver them. Returns
    /// whether there were any; an error has failed the session.
    fn consume_locked(&self, inner: &mut Inner) -> Result<bool> {
        let mut any = false;
        loop {
            let Some(ring) = inner.ring.as_mut() else {
                return Ok(any);
            };
            let bytes = match ring.rings.read(ring::READ_BYTES) {
                Ok(b) => b,
                Err(e) => return Err(self.fail_locked(inner, ClientError::from(e))),
            };
            if bytes.is_empty() {
                return Ok(any);
            }
            any = true;
            inner.last_rx = Instant::now();
            match inner.session.receive_data(&bytes) {
                Ok(replies) => Self::deliver_locked(inner, replies),
                Err(e) => return Err(self.fail_locked(inner, ClientError::from(e))),
            }
        }
    }

    /// The keepalive of PROTOCOL.md 11, on a quiet turn of the reader: a PING when a
    /// request is outstanding and nothing came for an interval, failure when the PING
    /// is not answered within another. False once the session has failed.
    fn keepalive_locked(&self, inner: &mut Inner) -> bool {
        let interval = Duration::from_secs(KEEPALIVE_INTERVAL_SECS);
        if inner.session.pending() == 0 {
            inner.last_rx = Instant::now();
            return true;
        }
        match inner.ping {
            Some((_, sent)) if sent.elapsed() >= interval => {
                let e = ClientError::Unavailable(format!(
                    "{}: no answer to a keepalive in {}s",
                    self.path.display(),
                    KEEPALIVE_INTERVAL_SECS
                ));
                self.fail_locked(inner, e);
                return false;
            }
            None if inner.last_rx.elapsed() >= interval => {
                if let Ok(id) = self.send_locked(inner, &RequestBody::Ping, None) {
                    inner.ping = Some((id, Instant::now()));
                }
            }
            _ => {}
        }
        inner.failure.is_none()
    }

    /// The reader thread of a switchless session: it never spins (callers do, for
    /// their own replies); it sleeps in `poll` on the doorbell and the session socket,
    /// so the service rings it only while no caller spins, and a dead service (EOF on
    /// either) is noticed at once and resumed from. While requests are outstanding it
    /// wakes at least every `BACKSTOP` and rings the service again if they still sit
    /// unread.
    fn ring_reader(&self, sock: &UnixStream) -> Turn {
        let fd = sock.as_raw_fd();
        loop {
            let (timeout, bell) = {
                let inner = self.lock();
                if inner.failure.is_some() {
                    return Turn::Failed;
                }
                let Some(ring) = inner.ring.as_ref() else {
                    return Turn::Upgraded; // only this thread drops it; never happens
                };
                let timeout = if inner.session.pending() > 0 {
                    ring::BACKSTOP.as_millis() as i32
                } else {
                    1000
                };
                (timeout, ring.bell())
            };
            let polled = sys::poll_two(bell, fd, libc::POLLIN, timeout);
            let mut guard = self.lock();
            let inner = &mut *guard;
            if inner.failure.is_some() {
                return Turn::Failed;
            }
            let polled = match polled {
                Ok(p) => p,
                Err(e) => {
                    self.fail_locked(inner, ClientError::Unavailable(e.to_string()));
                    return Turn::Failed;
                }
            };
            let checked = (|| {
                if polled.second {
                    match &inner.conn {
                        Some(c) => Self::check_fd(c).map_err(Fault::Local)?,
                        None => {
                            return Err(Fault::Local(ClientError::Unavailable(
                                "connection replaced".into(),
                            )))
                        }
                    }
                    ring::check_socket(sock, 0).map_err(Fault::of_service)?;
                }
                if polled.first {
                    inner
                        .ring
                        .as_ref()
                        .expect("ring mode")
                        .drain_bell()
                        .map_err(Fault::of_service)?;
                }
                Ok(())
            })();
            match checked {
                Ok(()) => {}
                Err(Fault::Gone(why)) => return Turn::Lost(why),
                Err(Fault::Local(e)) => {
                    self.fail_locked(inner, e);
                    return Turn::Failed;
                }
            }
            let got = match self.consume_locked(inner) {
                Ok(got) => got,
                Err(_) => return Turn::Failed,
            };
            if !polled.first && !polled.second && !got {
                if !self.keepalive_locked(inner) {
                    return Turn::Failed;
                }
                let Some(ring) = inner.ring.as_mut() else {
                    return Turn::Upgraded;
                };
                let unread = ring.rings.unconsumed().map(|n| n > 0);
                let rung = match unread {
                    Ok(true) => ring.ring(),
                    Ok(false) => Ok(()),
                    Err(e) => Err(ClientError::from(e)),
                };
                match rung {
                    Ok(()) => {}
                    // The service's end of the doorbell is gone: so is the service.
                    Err(ClientError::Unavailable(why)) if inner.session.resumable() => {
                        return Turn::Lost(why)
                    }
                    Err(e) => {
                        self.fail_locked(inner, e);
                        return Turn::Failed;
                    }
                }
            }
        }
    }

    /// Block until the reply to `req_id` is in its slot (or the session failed): read
    /// the socket for it while nobody else does, else sleep on this thread's eventfd
    /// until whoever reads delivers it.
    fn wait_for(&self, req_id: u64, interruptible: bool) -> Result<Reply> {
        loop {
            let (wake, sock, fd_checked) = {
                let mut guard = self.lock();
                let inner = &mut *guard;
                let Some(slot) = inner.slots.get_mut(&req_id) else {
                    return Err(ClientError::Invalid(format!(
                        "request {req_id} is not pending"
                    )));
                };
                slot.parked = false;
                if let Some(reply) = slot.reply.take() {
                    inner.slots.remove(&req_id);
                    return final_reply(reply);
                }
                if let Some(e) = inner.failure.clone() {
                    inner.slots.remove(&req_id);
                    return Err(e);
                }
                let wake = slot.wake;
                // Read for ourselves only while nobody reads and nobody else sleeps for
                // a reply (the reader thread serves several waiters).
                let can_read = inner.role == Role::Idle && !Self::thread_needed_locked(inner);
                let sock = match (&inner.conn, can_read) {
                    (Some(c), true) => Some(Arc::clone(&c.sock)),
                    _ => None,
                };
                let mut fd_checked = false;
                if let Some(slot) = inner.slots.get_mut(&req_id) {
                    if sock.is_some() {
                        slot.reading = true;
                        fd_checked = std::mem::take(&mut slot.checked);
                    } else {
                        slot.checked = false; // stale by the time it reads, if ever
                        slot.parked = true;
                    }
                }
                if sock.is_some() {
                    inner.role = Role::Caller;
                } else if inner.role == Role::Idle && inner.ring.is_none() {
                    // Nobody reads, and we may not (a PING or a resume is the thread's
                    // business): the reader thread must.
                    self.kick_locked(inner);
                }
                (wake, sock, fd_checked)
            };
            if let Some(sock) = sock {
                let mut reading = Reading {
                    shared: self,
                    req_id,
                    done: false,
                };
                if reading.read(&sock, interruptible, fd_checked).is_err() {
                    return Err(ClientError::Interrupted);
                }
                continue; // the reply (or the failure) is in: the slot says which
            }
            match sys::poll_in(wake, -1) {
                Ok(Polled::Interrupted) if interruptible => {
                    self.unpark(req_id);
                    return Err(ClientError::Interrupted);
                }
                Ok(_) => sys::eventfd_drain(wake),
                Err(e) => {
                    self.unpark(req_id);
                    return Err(ClientError::Unavailable(format!("poll: {e}")));
                }
            }
        }
    }

    fn unpark(&self, req_id: u64) {
        if let Some(slot) = self.lock().slots.get_mut(&req_id) {
            slot.parked = false;
        }
    }

    /// Switchless: spin on the reply ring for the reply to `req_id` (taking and
    /// delivering whatever arrives), for `CLIENT_SPIN` at most, or `PARKED_SPIN` once the
    /// service says it has executed everything we sent (a queued wait is left). While
    /// any thread spins the service need not ring; the last one to stop says it must,
    /// then looks once more. No-op in socket mode; a spinner whose rings go (the
    /// service died) stops at once and waits on its eventfd like a socket caller.
    fn spin_for(&self, req_id: u64) {
        let start = Instant::now();
        let gen = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let Some(ring) = inner.ring.as_mut() else {
                return;
            };
            match inner.slots.get_mut(&req_id) {
                Some(slot) if slot.reply.is_none() && inner.failure.is_none() => {
                    slot.spinning = true;
                }
                _ => return,
            }
            ring.spinners += 1;
            if ring.spinners == 1 {
                ring.rings.set_sleeping(false);
            }
            inner.ring_gen
        };
        let mut end = start + ring::CLIENT_SPIN;
        let mut parked = false;
        loop {
            let service_has_all = {
                let mut guard = self.lock();
                let inner = &mut *guard;
                if inner.ring_gen != gen {
                    break;
                }
                if self.consume_locked(inner).is_err() || inner.failure.is_some() {
                    break;
                }
                if inner.slots.get(&req_id).is_none_or(|s| s.reply.is_some()) {
                    break;
                }
                let rings = inner.ring.as_ref().map(|r| &r.rings);
                if !parked && rings.is_some_and(|r| r.all_done()) {
                    end = end.min(Instant::now() + ring::PARKED_SPIN);
                    parked = true;
                }
                rings.is_some_and(|r| r.unconsumed().is_ok_and(|n| n == 0))
            };
            let now = Instant::now();
            if now >= end {
                break;
            }
            if service_has_all && now - start < ring::PURE_SPIN {
                // The service took our requests: it is at work on another vCPU.
                std::hint::spin_loop();
            } else {
                // Our requests still sit in the ring (the service is asleep, or waits
                // for this very vCPU), or we spun long enough: the service, or the
                // thread that will post, may need this vCPU.
                std::thread::yield_now();
            }
        }
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(slot) = inner.slots.get_mut(&req_id) {
            slot.spinning = false;
        }
        if inner.ring_gen != gen {
            return; // the rings we spun on are gone, and their count with them
        }
        let Some(ring) = inner.ring.as_mut() else {
            return;
        };
        ring.spinners = ring.spinners.saturating_sub(1);
        if ring.spinners == 0 && inner.failure.is_none() {
            // From here the service rings for replies; one that it published before it
            // could see the flag is taken now (the reader thread gets the rest).
            match ring.rings.sleep_check() {
                Ok(0) => {}
                Ok(_) => {
                    let _ = self.consume_locked(inner);
                }
                Err(e) => {
                    self.fail_locked(inner, ClientError::from(e));
                }
            }
        }
    }
}

/// What went wrong on a switchless session's socket or doorbell: the service went
/// away (EOF, reset: resume), or something to fail the session for.
enum Fault {
    Gone(String),
    Local(ClientError),
}

impl Fault {
    /// A check of the service's end: unavailable means it went away; a byte on the
    /// socket or any other error fails the session.
    fn of_service(e: ClientError) -> Fault {
        match e {
            ClientError::Unavailable(why) => Fault::Gone(why),
            other => Fault::Local(other),
        }
    }
}

/// A calling thread holding `Role::Caller` for its request `req_id`. Dropping it (also
/// on a panic) gives the role back, so the socket is never left with nobody to read it.
struct Reading<'a> {
    shared: &'a Shared,
    req_id: u64,
    done: bool,
}

impl Reading<'_> {
    /// Read the socket until the reply to `req_id` is in its slot, the session failed,
    /// or the connection was lost (handed to the reader thread, which resumes); the
    /// role is given back in each case. `Err(())`: a signal interrupted an
    /// `interruptible` wait (the request stays pending).
    fn read(
        &mut self,
        sock: &UnixStream,
        interruptible: bool,
        mut fd_checked: bool,
    ) -> std::result::Result<(), ()> {
        let sh = self.shared;
        let fd = sock.as_raw_fd();
        let mut buf = [0u8; 4096];
        loop {
            if !fd_checked {
                // As the reader thread does: never read a file the program put at our
                // number. (Skipped right after our own send, which checked it.)
                let mut inner = sh.lock();
                let check = match &inner.conn {
                    Some(c) => Shared::check_fd(c),
                    None => Err(ClientError::Unavailable("connection replaced".into())),
                };
                if let Err(e) = check {
                    sh.fail_locked(&mut inner, e);
                    return self.finish(&mut inner, Ok(()));
                }
            }
            fd_checked = false;
            // Poll first only when a signal must interrupt us: a handler installed with
            // SA_RESTART would restart a blocking read, never a poll.
            if interruptible {
                match sys::poll_in(fd, -1) {
                    Ok(Polled::Interrupted) => {
                        let mut inner = sh.lock();
                        return self.finish(&mut inner, Err(()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let mut inner = sh.lock();
                        sh.fail_locked(&mut inner, ClientError::Unavailable(e.to_string()));
                        return self.finish(&mut inner, Ok(()));
                    }
                }
            }
            let got = (&*sock).read(&mut buf);
            let mut guard = sh.lock();
            let inner = &mut *guard;
            if inner.failure.is_some() {
                return self.finish(inner, Ok(()));
            }
            match got {
                Ok(0) => return self.lost(inner),
                Ok(n) => {
                    if let Turn::Failed = sh.received_locked(inner, sock, &buf[..n]) {
                        return self.finish(inner, Ok(()));
                    }
                    if inner
                        .slots
                        .get(&self.req_id)
                        .is_none_or(|s| s.reply.is_some())
                    {
                        return self.finish(inner, Ok(()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    if interruptible {
                        return self.finish(inner, Err(()));
                    }
                }
                Err(e) if resume::is_connection_loss(&e) => return self.lost(inner),
                Err(e) => {
                    sh.fail_locked(inner, ClientError::Unavailable(e.to_string()));
                    return self.finish(inner, Ok(()));
                }
            }
        }
    }

    /// The connection is gone (EOF, reset): the reader thread resumes the session (or
    /// fails it); meanwhile this caller waits for its reply like any other.
    fn lost(&mut self, inner: &mut Inner) -> std::result::Result<(), ()> {
        if let Some(slot) = inner.slots.get_mut(&self.req_id) {
            slot.reading = false;
        }
        self.done = true;
        inner.role = Role::Idle;
        self.shared.kick_locked(inner);
        Ok(())
    }

    fn finish(
        &mut self,
        inner: &mut Inner,
        out: std::result::Result<(), ()>,
    ) -> std::result::Result<(), ()> {
        self.done = true;
        self.shared.release_locked(inner, self.req_id);
        out
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut inner = self.shared.lock();
            self.shared.release_locked(&mut inner, self.req_id);
        }
    }
}

/// A failed reconnection attempt: worth another try, or the end of the session.
enum Attempt {
    Retry(String),
    Fatal(ClientError),
}

/// Connect to `sock` and run the handshake pinning `service_public`, before
/// `deadline`: the new connection (close-on-exec, at `HIGH_FD` or above), its identity
/// and its established session. `Unavailable` means nothing answered (yet).
/// Connect and complete the handshake by `deadline`. A signal that interrupts the wait
/// for the WELCOME calls `on_signal`: false ends the connect with `Interrupted`, the
/// half-made connection closed and nothing kept.
fn handshake(
    sock: &Path,
    service_public: &[u8; 32],
    deadline: Instant,
    on_signal: &mut dyn FnMut() -> bool,
) -> Result<(UnixStream, (u64, u64), ClientSession)> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ClientError::Unavailable(format!("no esem service at {}: {e}", sock.display()))
    };
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            // EAGAIN: the listen backlog is full; a Unix socket does not queue us.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
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
    let _ = sys::send_all(&stream, &hello);
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
    Ok((stream, ident, session))
}

/// A reply as the caller sees it: ESTALE (the service lost this reply across a
/// restart, and says so rather than guess) is the service's unavailability, not a
/// refusal of the operation.
fn final_reply(reply: Reply) -> Result<Reply> {
    if reply.status == Status::ESTALE {
        return Err(ClientError::Unavailable(format!(
            "reply lost across a service restart (request {})",
            reply.req_id
        )));
    }
    Ok(reply)
}

thread_local! {
    /// This thread's doorbell, with the pid that created it (a fork child's copy of
    /// the parent's eventfd is the same file description: never shared, replaced).
    static WAKE: std::cell::RefCell<Option<(u32, OwnedFd)>> = const { std::cell::RefCell::new(None) };
}

/// This thread's doorbell eventfd (created on first use, replaced after fork): a
/// thread that sent a request may `poll` it and then call `Client::try_reply`.
pub fn my_wake_fd() -> Result<RawFd> {
    let pid = sys::pid();
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
    /// Connect to the service found as `esem.paths` finds it (environment, default);
    /// switchless if `ESEM_SWITCHLESS` asks for it (a refusal falls back to the socket).
    pub fn connect() -> Result<Client> {
        let sock = paths::socket_path();
        let default = paths::is_default_location();
        let key = paths::read_pubkey(&sock, default).map_err(|e| {
            ClientError::Unavailable(format!(
                "no esem service at {} (cannot read its public key: {e})",
                sock.display()
            ))
        })?;
        let source = if paths::pubkey_from_env() {
            KeySource::Given
        } else {
            KeySource::Published {
                default_location: default,
            }
        };
        Self::connect_pinned(
            &sock,
            &key,
            source,
            Switchless::from_environment(),
            &mut || true,
        )
    }

    /// Connect to `sock`, pinning `service_public`; switchless if `ESEM_SWITCHLESS`
    /// asks for it (a refusal falls back to the socket).
    pub fn connect_to(sock: &Path, service_public: &[u8; 32]) -> Result<Client> {
        Self::connect_with(sock, service_public, Switchless::from_environment())
    }

    /// Connect to `sock`, pinning `service_public`, in the transport `mode` asks for.
    pub fn connect_with(
        sock: &Path,
        service_public: &[u8; 32],
        mode: Switchless,
    ) -> Result<Client> {
        Self::connect_pinned(sock, service_public, KeySource::Given, mode, &mut || true)
    }

    /// `connect_with`, calling `on_signal` whenever a signal interrupts the wait for the
    /// service's WELCOME: if it returns false, the half-made connection is closed
    /// (nothing kept) and `Interrupted` returned. For a binding whose signal handlers
    /// must run, and may end the connect, as its own client's do (Python's).
    pub fn connect_to_interruptible(
        sock: &Path,
        service_public: &[u8; 32],
        mode: Switchless,
        on_signal: &mut dyn FnMut() -> bool,
    ) -> Result<Client> {
        Self::connect_pinned(sock, service_public, KeySource::Given, mode, on_signal)
    }

    fn connect_pinned(
        sock: &Path,
        service_public: &[u8; 32],
        key_source: KeySource,
        mode: Switchless,
        on_signal: &mut dyn FnMut() -> bool,
    ) -> Result<Client> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ClientError::Unavailable(format!("no esem service at {}: {e}", sock.display()))
        };
        let deadline = Instant::now() + Duration::from_secs(CONNECT_TIMEOUT_SECS);
        let creds = (sys::geteuid(), sys::getegid());
        let (stream, ident, mut session) = handshake(sock, service_public, deadline, on_signal)?;
        // A fresh session has nothing else pending: no other reply can come first.
        let ring = ring::upgrade(&stream, &mut session, deadline, mode, &mut Vec::new())?;
        let fd = stream.as_raw_fd();
        let kick = sys::eventfd().map_err(|e| unavailable(&e))?;
        let shared = Arc::new(Shared {
            path: sock.to_path_buf(),
            key: *service_public,
            key_source,
            resume_timeout: resume::resume_timeout(),
            mode,
            fd: AtomicI32::new(fd),
            ring_map: [AtomicUsize::new(0), AtomicUsize::new(0)],
            ring_fds: [AtomicI32::new(-1), AtomicI32::new(-1)],
            kick: AtomicI32::new(kick.into_raw_fd()),
            inner: Mutex::new(Inner {
                session,
                slots: HashMap::new(),
                failure: None,
                ping: None,
                last_rx: Instant::now(),
                conn: Some(Conn {
                    sock: Arc::new(stream),
                    ident,
                }),
                ring: None,
                ring_gen: 0,
                reupgrade: false,
                role: Role::Idle,
            }),
        });
        if let Some(ring) = ring {
            let mut inner = shared.lock();
            shared.install_ring_locked(&mut inner, ring);
        }
        let reader = Arc::clone(&shared);
        SPAWNING.with(|f| f.set(true));
        let spawned = sys::with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("esem-reader".into())
                .spawn(move || reader.reader())
        });
        SPAWNING.with(|f| f.set(false));
        spawned.map_err(|e| unavailable(&e))?;
        READER_PID.store(sys::pid(), Ordering::Release);
        Ok(Client {
            shared,
            pid: sys::pid(),
            forked: AtomicBool::new(false),
            creds,
        })
    }

    /// The session's transport now: "switchless" (the rings) or "socket" (also while a
    /// session that had rings is resuming over the socket).
    pub fn mode(&self) -> &'static str {
        if self.shared.lock().ring.is_some() {
            "switchless"
        } else {
            "socket"
        }
    }

    /// The switchless region's descriptor (for tools and the ring adversary), if any.
    pub fn ring_memfd(&self) -> Option<RawFd> {
        self.shared.lock().ring.as_ref().map(ClientRing::memfd)
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
        if let Err(e) = self.check_pid() {
            return Some(e);
        }
        self.shared.lock().failure.clone()
    }

    /// Whether this is still the process that made the client (not a fork child of
    /// it, whether or not the fork ran the atfork handler).
    fn in_own_process(&self) -> bool {
        self.pid == sys::pid() && !self.forked.load(Ordering::Acquire)
    }

    fn check_pid(&self) -> Result<()> {
        if !self.in_own_process() {
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
        inner.slots.insert(
            id,
            Slot {
                reply: None,
                wake,
                spinning: false,
                reading: false,
                parked: false,
                checked: inner.ring.is_none() && inner.conn.is_some(),
            },
        );
        Ok(id)
    }

    /// The reply to `req_id` if it has arrived (`None` while pending), without
    /// blocking; drains this thread's doorbell first. For callers that sleep in a
    /// `poll` of their own on `my_wake_fd()` (the preload library's cancellable waits).
    pub fn try_reply(&self, req_id: u64) -> Option<Result<Reply>> {
        if let Err(e) = self.check_pid() {
            return Some(Err(e));
        }
        self.shared.spin_for(req_id);
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
            return Some(final_reply(reply));
        }
        if let Some(e) = inner.failure.clone() {
            inner.slots.remove(&req_id);
            return Some(Err(e));
        }
        // The caller sleeps on its eventfd next: somebody must read for it.
        slot.parked = true;
        slot.checked = false;
        if inner.role == Role::Idle {
            self.shared.kick_locked(inner);
        }
        None
    }

    /// Block until the reply to `req_id` arrives. With `interruptible`, a signal
    /// delivered to this thread returns `Interrupted` and the request stays pending
    /// (wait again to get its reply).
    pub fn wait_reply(&self, req_id: u64, interruptible: bool) -> Result<Reply> {
        self.check_pid()?;
        self.shared.spin_for(req_id);
        self.shared.wait_for(req_id, interruptible)
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

    /// End the session now (as dropping the client does: END, so the service ends it at
    /// once instead of keeping it for a resume): every waiter wakes with the failure and
    /// the service closes the session's handles. For owners that cannot drop the client
    /// while other threads may still hold it (a language binding).
    pub fn close(&self) {
        if self.in_own_process() {
            let mut inner = self.shared.lock();
            self.shared.end_locked(&mut inner);
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
        if self.pid != sys::pid() {
            self.forked_away();
        }
    }

    /// The fork-child handler's part: close our copy of the socket without sending.
    fn forked_away(&self) {
        self.forked.store(true, Ordering::Release);
        let sh = &self.shared;
        sys::close_raw(sh.fd.swap(-1, Ordering::AcqRel));
        sys::close_raw(sh.kick.swap(-1, Ordering::AcqRel));
        // Never touch the parent's rings: drop the mapping and our descriptor copies.
        let map = (
            sh.ring_map[0].swap(0, Ordering::AcqRel),
            sh.ring_map[1].swap(0, Ordering::AcqRel),
        );
        let fds = (
            sh.ring_fds[0].swap(-1, Ordering::AcqRel),
            sh.ring_fds[1].swap(-1, Ordering::AcqRel),
        );
        ring::forget_in_child(map, fds);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // In a fork child the lock may be held by a thread that no longer exists: an
        // inherited client is left alone (its descriptor stays open in the child).
        if self.in_own_process() {
            let mut inner = self.shared.lock();
            self.shared.end_locked(&mut inner);
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
    c.pid == sys::pid() && c.failure().is_none()
}

/// This process's client: connected on first use, replaced after `fork` and after the
/// session failed.
pub fn process_client() -> Result<&'static Client> {
    ATFORK.call_once(|| {
        let _ = sys::at_fork_child(after_fork_in_child);
        // Keep the exit hook's object in every link that uses the process client.
        std::hint::black_box(&END_AT_EXIT);
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
    READER_PID.load(Ordering::Acquire) == sys::pid()
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

/// The process is exiting: END its session (best effort) so the service ends it at
/// once instead of keeping it for a resume through the grace period. Registered in
/// `.fini_array`, which glibc runs after every `atexit` handler (a program's handlers
/// may still use their semaphores); never blocks on the session's lock.
extern "C" fn end_at_exit() {
    let Some(c) = current() else { return };
    if !c.in_own_process() {
        return;
    }
    let Ok(mut inner) = c.shared.inner.try_lock() else {
        return;
    };
    c.shared.end_locked(&mut inner);
    c.shared.fail_locked(
        &mut inner,
        ClientError::Unavailable("the process is exiting".into()),
    );
}

#[used]
#[link_section = ".fini_array"]
static END_AT_EXIT: extern "C" fn() = end_at_exit;

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
    c.shared.fd.load(Ordering::Acquire)
}
