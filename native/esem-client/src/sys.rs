//! The few system calls std does not offer, each behind a safe function. With the
//! switchless mapping's accessors (`ring.rs`), the only `unsafe` of the client; every
//! block says why it is sound.

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

// ------------------------------------------------- for the switchless transport

/// `fstat` of `fd`.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a struct stat into the buffer we pass; any fd value is fine.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so the struct is initialised (it was zeroed anyway).
    Ok(unsafe { st.assume_init() })
}

/// The seals of a memfd (`F_GET_SEALS`); an error for anything else.
pub fn get_seals(fd: RawFd) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS only reads the file's seals.
    let s = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

fn sockopt_int(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live `v`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Whether `fd` is a Unix stream socket.
pub fn is_unix_stream(fd: RawFd) -> bool {
    sockopt_int(fd, libc::SO_DOMAIN).ok() == Some(libc::AF_UNIX)
        && sockopt_int(fd, libc::SO_TYPE).ok() == Some(libc::SOCK_STREAM)
}

/// Set `O_NONBLOCK` on our descriptor (a socket pair end is a description of its own:
/// the peer's flags are not ours).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and change the descriptor's status flags.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Send one byte without blocking and without SIGPIPE (a doorbell).
pub fn send_byte(fd: RawFd) -> io::Result<()> {
    let b = [1u8];
    // SAFETY: sends one byte from a live buffer.
    let n = unsafe {
        libc::send(
            fd,
            b.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Read a non-blocking socket until it would block: `Ok(true)`, or `Ok(false)` at EOF.
pub fn drain_socket(fd: RawFd) -> io::Result<bool> {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: reads at most buf.len() bytes into the live buffer.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n == 0 {
            return Ok(false);
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(true),
                io::ErrorKind::Interrupted => continue,
                _ => Err(e),
            };
        }
    }
    Ok(true) // still ringing: the next poll wakes us again
}

/// Whether a socket has a byte to read (`Some(true)`), is at EOF (`Some(false)`) or has
/// nothing yet (`None`), without taking the byte.
pub fn peek_byte(fd: RawFd) -> io::Result<Option<bool>> {
    let mut b = [0u8; 1];
    // SAFETY: peeks at most one byte into the live buffer.
    let n = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n > 0))
}

/// Write all of `data` to `fd` (blocking), retrying on EINTR, without SIGPIPE.
pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: sends from a live buffer of data.len() bytes.
        let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// What `recv_fds_cloexec` got.
pub struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// `MSG_CTRUNC`: descriptors were cut off (more came than we made room for).
    pub truncated: bool,
}

/// `recvmsg` into `buf` with room for up to `max_fds` descriptors, received
/// close-on-exec (`MSG_CMSG_CLOEXEC`), so they never reach a program this process execs.
pub fn recv_fds_cloexec(fd: RawFd, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let fd_bytes = (max_fds * std::mem::size_of::<libc::c_int>()) as u32;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)]; // u64: cmsghdr alignment
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one; the fields set below point at live
    // buffers of the stated lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: recvmsg writes into the iovec's buffer and the control buffer, both
        // live and of the lengths given in `msg`.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled, bounded by the
    // msg_controllen it set; each SCM_RIGHTS payload holds whole c_ints, each a new
    // descriptor the kernel gave this process and nobody else owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    let raw = std::ptr::read_unaligned(
                        data.add(i * std::mem::size_of::<libc::c_int>())
                            .cast::<libc::c_int>(),
                    );
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        len: n,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Which of two descriptors `poll_two` found readable (or hung up).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Two {
    pub first: bool,
    pub second: bool,
}

/// Wait until `a` is readable or `b` has one of `b_events` (`POLLIN`: readable), or
/// either hangs up, for at most `timeout_ms`; a negative `b` is left out (poll ignores
/// it). EINTR is an empty result.
pub fn poll_two(a: RawFd, b: RawFd, b_events: libc::c_short, timeout_ms: i32) -> io::Result<Two> {
    let mut p = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: b_events,
            revents: 0,
        },
    ];
    // SAFETY: two pollfds, live for the call (a negative fd is ignored by poll).
    let rc = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Two::default());
        }
        return Err(e);
    }
    let hit = |p: &libc::pollfd| p.revents != 0;
    Ok(Two {
        first: hit(&p[0]),
        second: hit(&p[1]),
    })
}

// ------------------------------------------------- the process id without getpid

/// The page that caches this process's id: mapped with `MADV_WIPEONFORK`, so the
/// kernel hands every child made by `fork` (glibc's, `_Fork`, a raw `clone` without
/// `CLONE_VM`: `pthread_atfork` handlers run only for the first) a zeroed copy, and a
/// zero means "not cached here yet". A child that shares our memory (`vfork`,
/// `posix_spawn`) may only exec or exit, so it never runs the client.
static PID_PAGE: std::sync::atomic::AtomicPtr<std::sync::atomic::AtomicU32> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
/// 0: not mapped yet, 1: a thread is mapping it, 2: mapped, 3: unavailable (old
/// kernel). Not a `Once`: a fork while another thread is inside would leave a child
/// waiting forever; a thread that finds it being mapped asks the kernel instead.
static PID_PAGE_STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn pid_page() -> Option<&'static std::sync::atomic::AtomicU32> {
    use std::sync::atomic::Ordering;
    if PID_PAGE_STATE.load(Ordering::Acquire) == 0
        && PID_PAGE_STATE
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        let page = map_wipe_on_fork();
        PID_PAGE.store(page, Ordering::Release);
        let done = if page.is_null() { 3 } else { 2 };
        PID_PAGE_STATE.store(done, Ordering::Release);
    }
    let p = PID_PAGE.load(Ordering::Acquire);
    // SAFETY: a non-null pointer here is a page mapped below and never unmapped,
    // page-aligned (so aligned for AtomicU32), zero-filled, read and written only
    // through atomics.
    unsafe { p.as_ref() }
}

fn map_wipe_on_fork() -> *mut std::sync::atomic::AtomicU32 {
    const LEN: usize = 4096;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    // SAFETY: advises on the mapping just made, of exactly that length.
    if unsafe { libc::madvise(p, LEN, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: unmaps the mapping just made, which nothing else refers to.
        unsafe { libc::munmap(p, LEN) };
        return std::ptr::null_mut();
    }
    p.cast()
}

/// This process's id, read from memory: no `getpid` system call per operation (glibc
/// no longer caches it). A fork child's wiped page makes its first call ask the kernel
/// once. Without `MADV_WIPEONFORK` (Linux < 4.14) every call asks the kernel.
/// Async-signal-safe (an atomic load and store, `getpid`, at most one `mmap`).
pub fn pid() -> u32 {
    use std::sync::atomic::Ordering;
    let Some(cell) = pid_page() else {
        return std::process::id();
    };
    match cell.load(Ordering::Relaxed) {
        0 => {
            let real = std::process::id();
            cell.store(real, Ordering::Relaxed);
            real
        }
        cached => cached,
    }
}

/// Whether `pid` is served from the wipe-on-fork page (for tests).
#[cfg(test)]
fn pid_cached() -> bool {
    pid_page().is_some()
}

/// Wait until `kick` is readable or `sock` hangs up (POLLRDHUP, POLLHUP, POLLERR),
/// for at most `timeout_ms`; `sock` < 0 is left out. Data arriving on `sock` does not
/// wake this poll (the kernel filters wake-ups by the events asked for): the reader
/// thread waits like this while a calling thread reads the socket itself.
/// Returns (kicked, hung up); EINTR is (false, false).
pub fn poll_kick_or_hangup(kick: RawFd, sock: RawFd, timeout_ms: i32) -> io::Result<(bool, bool)> {
    let t = poll_two(kick, sock, libc::POLLRDHUP, timeout_ms)?;
    Ok((t.first, t.second))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_cached_and_right_in_fork_children_and_grandchildren() {
        assert!(pid_cached(), "MADV_WIPEONFORK unavailable: the fallback asks the kernel");
        assert_eq!(pid(), std::process::id());
        // SAFETY: the child only does async-signal-safe things (memory, getpid, fork,
        // waitpid, _exit) before `_exit`.
        let child = unsafe { libc::fork() };
        assert!(child >= 0);
        if child == 0 {
            let ok = pid() == std::process::id();
            // SAFETY: as above, in the child.
            let grand = unsafe { libc::fork() };
            if grand == 0 {
                let ok = pid() == std::process::id();
                // SAFETY: leaves the grandchild at once.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            }
            let mut st = 0;
            // SAFETY: waits for our own child into a live int.
            unsafe { libc::waitpid(grand, &mut st, 0) };
            let code = if !ok {
                1
            } else if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
                0
            } else {
                2
            };
            // SAFETY: leaves the child at once.
            unsafe { libc::_exit(code) };
        }
        let mut st = 0;
        // SAFETY: waits for our own child into a live int.
        unsafe { libc::waitpid(child, &mut st, 0) };
        assert!(libc::WIFEXITED(st), "child died: {st}");
        assert_eq!(libc::WEXITSTATUS(st), 0, "1: child's pid wrong, 2: grandchild's");
        assert_eq!(pid(), std::process::id());
    }
}
