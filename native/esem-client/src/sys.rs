//! The few system calls std does not offer, each behind a safe function. This is the
//! only module of the client with `unsafe`; every block says why it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Descriptors are moved to at least this number, out of the way of programs that
/// assume small numbers are theirs (`dup2(x, 3)`, closing 3..20 in a daemon).
pub const HIGH_FD: RawFd = 100;

/// A close-on-exec duplicate of `fd` numbered `HIGH_FD` or above; the original is
/// closed by the caller dropping it.
pub fn dup_high(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own only creates a new one.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// (device, inode) of what `fd` refers to: checked before each use, so a program that
/// closed our descriptor and reused its number is noticed instead of written to.
pub fn identity(fd: RawFd) -> io::Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a struct stat into the buffer we pass; any fd value is fine.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the struct is initialised (it was zeroed anyway).
    let st = unsafe { st.assume_init() };
    Ok((st.st_dev, st.st_ino))
}

/// Write all of `buf` to the socket `sock` with `MSG_NOSIGNAL`: a service that died
/// is an `EPIPE` to resume from, never a SIGPIPE that kills the program (a C program's
/// default disposition; std's `write` would raise it).
pub fn send_all(sock: &std::os::unix::net::UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: sends from a live buffer of `buf.len()` bytes on a socket we own.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// A non-blocking, close-on-exec eventfd, moved high: a waiting thread's doorbell.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd only creates a descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    dup_high(&fd)
}

/// Ring an eventfd (async-signal-safe: one write).
pub fn eventfd_ring(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64; a failure (counter full) still leaves the
    // eventfd readable, which is all a ring needs.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Drain an eventfd (non-blocking).
pub fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Outcome of `poll_in`.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    Ready,
    Timeout,
    Interrupted,
}

/// Wait until `fd` is readable (or hung up) for at most `timeout_ms` (-1: forever).
/// EINTR is returned as `Interrupted` so callers can implement `sem_wait`'s EINTR.
pub fn poll_in(fd: RawFd, timeout_ms: i32) -> io::Result<Polled> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, live for the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(Polled::Interrupted);
        }
        return Err(e);
    }
    Ok(if rc == 0 {
        Polled::Timeout
    } else {
        Polled::Ready
    })
}

/// Run `f` with every signal blocked in this thread; threads spawned inside inherit
/// the mask, so process-directed signals never land on the client's reader thread
/// (they must interrupt the program's own threads, e.g. a `sem_wait`).
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigfillset initialises `all`; pthread_sigmask reads `all` and writes
    // `old`, both live for the calls. Restored below with the saved mask.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
    }
    let out = f();
    // SAFETY: `old` was written by the call above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut()) };
    out
}

/// Register `child` to run in the child after every `fork`. It must be
/// async-signal-safe (the child of a multithreaded process may only do such things).
pub fn at_fork_child(child: extern "C" fn()) -> io::Result<()> {
    // SAFETY: registers a handler; the function pointer is 'static.
    let rc = unsafe { libc::pthread_atfork(None, None, Some(child)) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Close a descriptor number without owning it (the fork-child handler: the objects
/// that own it belong to the parent and are never used again in the child).
pub fn close_raw(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: close is async-signal-safe; the number is ours (or already closed).
        unsafe { libc::close(fd) };
    }
}

/// The process umask, read without changing it (`umask(2)` would race other threads).
pub fn current_umask() -> u32 {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Umask:") {
                if let Ok(m) = u32::from_str_radix(v.trim(), 8) {
                    return m;
                }
            }
        }
    }
    0o022
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: getegid cannot fail and touches no memory.
    unsafe { libc::getegid() }
}
