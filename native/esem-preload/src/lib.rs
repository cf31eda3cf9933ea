//! libesem_preload.so: the POSIX semaphore API (`sem_open` ... `sem_destroy`) over the
//! esem service, for unmodified programs run under `LD_PRELOAD` (or `esem run`).
//!
//! Which semaphores move: by default only `sem_open(name, oflag | USE_ESEM, ...)`
//! (`native/include/esem.h`); with `ESEM_PRELOAD_ALL=1` every named and unnamed one.
//! Everything else goes to glibc's own functions (`dlsym(RTLD_NEXT, ...)`). Two esem
//! functions beside POSIX's, `esem_sem_open_keyed` and `esem_sem_unlink_keyed`, reach
//! key-bound e-semaphores from C (their `sem_t` then MACs every request under the key).
//!
//! The 32-byte `sem_t` of an e-semaphore holds a magic word and the 16-byte handle
//! token that finds it in the service, never its count. The magic's low 32 bits have
//! bit 31 set, which glibc's own `sem_t` (whose low word is a count <= SEM_VALUE_MAX)
//! never has, so telling the two apart cannot misfire. A process that did not create
//! the token (a fork child, another process sharing the memory of an unnamed
//! `pshared` semaphore) ATTACHes through its own session on first use.
//!
//! This is the one module of the native code with `unsafe`: it dereferences the
//! pointers the C caller hands in (the API's contract is that they are valid), calls
//! glibc through `dlsym`, and keeps a small lock-free table. Every exported function
//! runs its Rust body inside `catch_unwind`, so a panic never crosses into the host
//! program (it becomes `EIO`), with cancellation disabled (`sem_open`/`sem_unlink`
//! are not cancellation points, and a cancellation must never unwind Rust frames: the
//! waits that are cancellation points are in `shim.c`), and errors become `errno`.
//!
//! `sem_post` from a signal handler: POSIX makes `sem_post` async-signal-safe. A
//! handler that interrupts this library's own code on the same thread (which may hold
//! the session lock) must not take that lock again; such a post is recorded in a
//! lock-free table of owed posts and sent when the interrupted call leaves the library
//! (before anything else, so it is not reordered after a later request of that
//! thread). A post from a handler that interrupted the program elsewhere is sent at
//! once, which takes the session lock and allocates: safe unless the handler
//! interrupted the program inside `malloc` itself, a limit this library documents.

#![allow(clippy::missing_safety_doc)] // the C API's contract is POSIX's

use esem_client::conn::my_wake_fd;
use esem_client::{process_client, Client, ClientError, OpenOptions, Semaphore};
use esem_proto::consts::{KEY_MAX_BYTES, KEY_MIN_BYTES, SEM_VALUE_MAX};
use esem_proto::{Handle, Status, WaitMode};
use libc::{c_char, c_int, c_uint, c_void, clockid_t, mode_t, sem_t, timespec};
use std::cell::{Cell as StdCell, UnsafeCell};
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once};

/// `oflag` bit of `sem_open` that asks for an e-semaphore (see esem.h for the choice).
pub const USE_ESEM: c_int = 0x4000_0000;
/// "esem" in the high word, 0xE5E5E5E5 (bit 31 set: never a glibc count) in the low.
const MAGIC: u64 = 0x6D65_7365_E5E5_E5E5;
const KIND_NAMED: u32 = 1;
const KIND_UNNAMED: u32 = 2;
/// Unnamed with `pshared == 0`: a fork child's use is of its own copy (as with glibc,
/// whose private semaphore is plain memory that fork copies), made on first use.
const KIND_PRIVATE: u32 = 3;

/// What an e-semaphore's `sem_t` holds.
#[repr(C)]
struct SemCell {
    magic: u64,
    token: Handle,
    pid: u32,
    kind: u32,
}
const _: () = assert!(std::mem::size_of::<SemCell>() == std::mem::size_of::<sem_t>());
const _: () = assert!(std::mem::align_of::<SemCell>() <= std::mem::align_of::<sem_t>());
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
compile_error!("sem_open's variadic arguments are read as fixed ones: Linux x86-64/aarch64 only");

// ------------------------------------------------------------------ glibc, forwarded

const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
const PTHREAD_CANCEL_DISABLE: c_int = 1;

extern "C" {
    fn pthread_setcancelstate(state: c_int, oldstate: *mut c_int) -> c_int;
}

/// glibc's definition of `name`, looked up once.
fn real(slot: &AtomicUsize, name: &CStr) -> usize {
    let mut f = slot.load(Ordering::Acquire);
    if f == 0 {
        // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks a symbol up.
        f = unsafe { libc::dlsym(RTLD_NEXT, name.as_ptr()) } as usize;
        slot.store(f, Ordering::Release);
    }
    f
}

macro_rules! real_fn {
    ($slot:ident, $name:literal, $ty:ty) => {{
        static $slot: AtomicUsize = AtomicUsize::new(0);
        let f = real(&$slot, $name);
        if f == 0 {
            None
        } else {
            // SAFETY: the symbol glibc exports under this name has this C type.
            Some(unsafe { std::mem::transmute::<usize, $ty>(f) })
        }
    }};
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

// --------------------------------------------------------------------- the table

/// A spin lock rather than a Mutex: the fork handlers take it before `fork` and
/// release it in both processes, so a child never inherits it held.
struct Spin<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for Spin<T> {}

impl<T> Spin<T> {
    const fn new(v: T) -> Self {
        Spin {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(v),
        }
    }
    fn acquire(&self) {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
            std::thread::yield_now();
        }
    }
    fn release(&self) {
        self.locked.store(false, Ordering::Release);
    }
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        struct Unlock<'a>(&'a AtomicBool);
        impl Drop for Unlock<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        self.acquire();
        let _unlock = Unlock(&self.locked);
        // SAFETY: we hold the lock; the closure never blocks or calls back in.
        f(unsafe { &mut *self.value.get() })
    }
}

#[derive(Default)]
struct Table {
    /// By the token written in the sem_t.
    sems: HashMap<Handle, Arc<Semaphore>>,
    /// Named semaphores this process has open: name -> (its sem_t, sem_open count,
    /// the service's sem_id of the semaphore behind it).
    names: HashMap<String, (usize, u32, u64)>,
    /// Names this process ever opened as e-semaphores (for sem_unlink).
    esem_names: HashSet<String>,
    /// Named semaphores still open here whose name this process unlinked: their sem_t
    /// -> sem_open count. A later sem_open of the name is a new lookup (ENOENT, or a
    /// new semaphore), as glibc's is, while the old sem_t keeps working until closed.
    unlinked: HashMap<usize, u32>,
    /// Tokens of the private (pshared 0) unnamed semaphores this process made (or
    /// inherited: a fork child's table is its parent's copy).
    private: HashSet<Handle>,
}

/// The counts of the private unnamed semaphores at the last fork (the pid that took
/// them, token -> count): a fork child's copy starts from the count at the fork, as a
/// copy of glibc's plain-memory semaphore does.
static FORK_VALUES: Spin<(u32, Vec<(Handle, u32)>)> = Spin::new((0, Vec::new()));

fn fork_value(token: Handle) -> Option<u32> {
    FORK_VALUES.with(|(pid, values)| {
        if *pid == std::process::id() {
            return None; // this process's own snapshot, for its children
        }
        values.iter().find(|(t, _)| *t == token).map(|(_, v)| *v)
    })
}

/// Before fork: read the private semaphores' counts (one round trip each; none for a
/// program without them). A fork from a signal handler that interrupted the library
/// takes none: its child copies the count at first use instead.
fn snapshot_private() {
    if DEPTH.with(StdCell::get) != 0 {
        return;
    }
    let _ = guarded(|| {
        let sems: Vec<(Handle, Arc<Semaphore>)> = table(|t| {
            t.private
                .iter()
                .filter_map(|h| Some((*h, Arc::clone(t.sems.get(h)?))))
                .collect()
        });
        let mut values = Vec::with_capacity(sems.len());
        for (token, sem) in sems {
            // An inherited one not used here yet keeps the count of its own fork.
            let v = match fork_value(token) {
                Some(v) => Some(v),
                None => sem.value().ok(),
            };
            if let Some(v) = v {
                values.push((token, v));
            }
        }
        FORK_VALUES.with(|f| *f = (std::process::id(), values));
        Ok(())
    });
}

static TABLE: Spin<Option<Table>> = Spin::new(None);
static SETUP: Once = Once::new();
static ALL: AtomicBool = AtomicBool::new(false);

extern "C" fn fork_prepare() {
    snapshot_private();
    TABLE.acquire();
}
extern "C" fn fork_release() {
    TABLE.release();
}

fn setup() {
    SETUP.call_once(|| {
        ALL.store(
            std::env::var_os("ESEM_PRELOAD_ALL").is_some_and(|v| v == "1"),
            Ordering::Release,
        );
        // SAFETY: registers 'static handlers that only take or release the spin lock.
        unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release)) };
    });
}

fn table<R>(f: impl FnOnce(&mut Table) -> R) -> R {
    TABLE.with(|t| f(t.get_or_insert_with(Table::default)))
}

fn cell_of(s: *const sem_t) -> Option<&'static SemCell> {
    if s.is_null() {
        return None;
    }
    // SAFETY: the caller passes a sem_t (32 bytes, 8-aligned), as the API requires.
    let cell = unsafe { &*(s as *const SemCell) };
    (cell.magic == MAGIC).then_some(cell)
}

/// The e-semaphore behind `s` (registering one this process has not seen yet).
fn lookup(s: *const sem_t) -> Option<Arc<Semaphore>> {
    let cell = cell_of(s)?;
    if cell.kind == KIND_PRIVATE && cell.pid != std::process::id() {
        return private_copy(s as *mut sem_t).ok();
    }
    let token = cell.token;
    Some(table(|t| {
        Arc::clone(
            t.sems
                .entry(token)
                .or_insert_with(|| Arc::new(Semaphore::from_token(token, "(inherited)"))),
        )
    }))
}

/// A fork child's first use of a private unnamed semaphore it inherited: a new one
/// with the inherited one's count at the fork, written into the child's copy of the
/// `sem_t`, so the parent's and the child's no longer affect each other.
fn private_copy(s: *mut sem_t) -> Result<Arc<Semaphore>, c_int> {
    let old = cell_of(s).ok_or(libc::EINVAL)?.token;
    let value = match fork_value(old) {
        Some(v) => v,
        None => {
            // Not in the snapshot (made by a fork from a signal handler): now's count.
            let inherited = Semaphore::from_token(old, "(inherited)");
            let v = esem(inherited.value())?;
            let _ = inherited.close(); // this process's handle only
            v
        }
    };
    let (sem, token) = new_unnamed(value)?;
    let sem = Arc::new(sem);
    // SAFETY: `s` is one of ours (checked above): this process's copy of the sem_t.
    unsafe {
        let cell = &mut *(s as *mut SemCell);
        cell.token = token;
        cell.pid = std::process::id();
    }
    table(|t| {
        t.sems.remove(&old);
        t.private.remove(&old);
        t.private.insert(token);
        t.sems.insert(token, Arc::clone(&sem));
    });
    Ok(sem)
}

fn clear(s: *mut sem_t) {
    // SAFETY: `s` is one of ours (checked by the caller): a 32-byte sem_t.
    unsafe { (*(s as *mut SemCell)).magic = 0 };
}

// --------------------------------------------------------------------- guards

thread_local! {
    /// How deep this thread is inside the library (a signal handler that finds it
    /// above 0 interrupted us). Const-initialised, no destructor: safe in a handler.
    static DEPTH: StdCell<u32> = const { StdCell::new(0) };
}

const DEFER_SLOTS: usize = 64;
static DEFER_PTR: [AtomicUsize; DEFER_SLOTS] = [const { AtomicUsize::new(0) }; DEFER_SLOTS];
static DEFER_N: [AtomicU32; DEFER_SLOTS] = [const { AtomicU32::new(0) }; DEFER_SLOTS];
static DEFERRED: AtomicBool = AtomicBool::new(false);

/// Record a post owed by a signal handler (lock-free, allocation-free).
fn defer_post(s: *mut sem_t) -> bool {
    let p = s as usize;
    for i in 0..DEFER_SLOTS {
        let cur = DEFER_PTR[i].load(Ordering::Acquire);
        if cur == p
            || (cur == 0
                && DEFER_PTR[i]
                    .compare_exchange(0, p, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok())
        {
            DEFER_N[i].fetch_add(1, Ordering::AcqRel);
            DEFERRED.store(true, Ordering::Release);
            return true;
        }
    }
    false
}

fn flush_deferred() {
    if !DEFERRED.swap(false, Ordering::AcqRel) {
        return;
    }
    for i in 0..DEFER_SLOTS {
        let n = DEFER_N[i].swap(0, Ordering::AcqRel);
        let p = DEFER_PTR[i].load(Ordering::Acquire) as *mut sem_t;
        for _ in 0..n {
            if let Some(sem) = lookup(p) {
                let _ = sem.post();
            }
        }
    }
}

/// Run the Rust body of an exported function: cancellation disabled, panics caught,
/// owed posts sent first and last. Returns `Ok` or the errno.
fn guarded<T>(f: impl FnOnce() -> Result<T, c_int>) -> Result<T, c_int> {
    setup();
    let mut old = 0;
    // SAFETY: changes this thread's cancel state; restored below.
    unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut old) };
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    let r = catch_unwind(AssertUnwindSafe(|| {
        if depth == 0 {
            flush_deferred();
        }
        let r = f();
        if depth == 0 {
            flush_deferred();
        }
        r
    }));
    DEPTH.with(|d| d.set(depth));
    // SAFETY: restores the state saved above.
    unsafe { pthread_setcancelstate(old, std::ptr::null_mut()) };
    r.unwrap_or(Err(libc::EIO))
}

/// `0` or `-1` with errno, as the POSIX functions return.
fn c_result(r: Result<(), c_int>) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

fn errno_of(e: &ClientError) -> c_int {
    match e.status() {
        // A handle the service does not know: the sem_t is not a valid semaphore.
        Some(Status::EBADF) => libc::EINVAL,
        Some(Status::EKEYREJECTED) => libc::EACCES,
        Some(s) => s.errno(),
        None => e.errno(),
    }
}

fn esem<T>(r: esem_client::Result<T>) -> Result<T, c_int> {
    r.map_err(|e| errno_of(&e))
}

fn name_of(name: *const c_char) -> Result<String, c_int> {
    if name.is_null() {
        return Err(libc::EINVAL);
    }
    // SAFETY: the caller passes a NUL-terminated string, as the API requires.
    let c = unsafe { CStr::from_ptr(name) };
    c.to_str().map(str::to_owned).map_err(|_| libc::EINVAL)
}

// ------------------------------------------------------------------ named semaphores

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, ...) -> *mut sem_t;

/// `sem_open`. Its mode and value are variadic in C; read as fixed arguments, which on
/// Linux x86-64 and aarch64 arrive in the same registers (only used with O_CREAT).
#[no_mangle]
pub unsafe extern "C" fn sem_open(
    name: *const c_char,
    oflag: c_int,
    mode: mode_t,
    value: c_uint,
) -> *mut sem_t {
    setup();
    if oflag & USE_ESEM == 0 && !ALL.load(Ordering::Acquire) {
        return match real_fn!(REAL_OPEN, c"sem_open", OpenFn) {
            // SAFETY: glibc's sem_open with the caller's own arguments.
            Some(f) => unsafe { f(name, oflag, mode as c_uint, value) },
            None => {
                set_errno(libc::ENOSYS);
                std::ptr::null_mut()
            }
        };
    }
    sem_result(guarded(|| {
        open_esem(name, oflag & !USE_ESEM, mode, value, None)
    }))
}

/// A `sem_t *` or `SEM_FAILED` with errno.
fn sem_result(r: Result<*mut sem_t, c_int>) -> *mut sem_t {
    match r {
        Ok(p) => p,
        Err(e) => {
            set_errno(e);
            std::ptr::null_mut() // SEM_FAILED
        }
    }
}

/// The caller's key bytes, or `EINVAL` (a key-binding key has 16..32 bytes).
fn key_of(key: *const c_void, len: usize) -> Result<Vec<u8>, c_int> {
    if key.is_null() || !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&len) {
        return Err(libc::EINVAL);
    }
    // SAFETY: the caller passes `len` readable bytes at `key` (esem.h's contract).
    Ok(unsafe { std::slice::from_raw_parts(key as *const u8, len) }.to_vec())
}

/// The keyed entry points report a missing or wrong key as `EKEYREJECTED` (Linux's
/// errno 129, the status's own name); the POSIX functions, whose callers know only
/// POSIX's errnos, report it as `EACCES`.
fn keyed_errno(e: &ClientError, keyed: bool) -> c_int {
    if keyed && e.status() == Some(Status::EKEYREJECTED) {
        libc::EKEYREJECTED
    } else {
        errno_of(e)
    }
}

/// `esem_sem_open_keyed` (esem.h): `sem_open` of a key-bound e-semaphore. With
/// `O_CREAT` a new semaphore is bound to `key`; an existing one must have been bound
/// to it. The `sem_t` works with every `sem_*` function, each request and reply MAC'd
/// under the key (PROTOCOL.md 8). Always an e-semaphore: `USE_ESEM` is implied.
#[no_mangle]
pub unsafe extern "C" fn esem_sem_open_keyed(
    name: *const c_char,
    oflag: c_int,
    mode: mode_t,
    value: c_uint,
    key: *const c_void,
    key_len: usize,
) -> *mut sem_t {
    sem_result(guarded(|| {
        let key = key_of(key, key_len)?;
        open_esem(name, oflag & !USE_ESEM, mode, value, Some(key))
    }))
}

/// `esem_sem_unlink_keyed` (esem.h): `sem_unlink` of a key-bound e-semaphore.
#[no_mangle]
pub unsafe extern "C" fn esem_sem_unlink_keyed(
    name: *const c_char,
    key: *const c_void,
    key_len: usize,
) -> c_int {
    c_result(guarded(|| {
        let key = key_of(key, key_len)?;
        unlink_esem(name, Some(&key))
    }))
}

fn open_esem(
    name: *const c_char,
    oflag: c_int,
    mode: mode_t,
    value: c_uint,
    key: Option<Vec<u8>>,
) -> Result<*mut sem_t, c_int> {
    let keyed = key.is_some();
    let name = name_of(name)?;
    let create = oflag & libc::O_CREAT != 0;
    // glibc ignores O_EXCL alone
    let exclusive = create && oflag & libc::O_EXCL != 0;
    // glibc checks the value only when it creates (an existing name ignores it): a
    // value too large opens an existing name and is EINVAL if it would create.
    let over = create && value > SEM_VALUE_MAX;
    if over && exclusive {
        return Err(libc::EINVAL);
    }
    // Without O_CREAT, mode and value are not arguments at all (POSIX reads them only
    // when creating): what the variadic slots hold is garbage, never sent.
    let mut opts = OpenOptions {
        create: create && !over,
        exclusive,
        mode: if create { mode & 0o7777 } else { 0 },
        value: if create && !over { value } else { 0 },
        key,
        ..OpenOptions::default()
    };
    let errno = |e: ClientError| match keyed_errno(&e, keyed) {
        libc::ENOENT if over => libc::EINVAL,
        n => n,
    };
    // Every sem_open asks the service, as glibc's opens the file every time: the
    // permission is checked for each open and a name unlinked meanwhile is ENOENT.
    // The service knows the process session by the credentials it had at connect; if
    // the process has changed its effective uid or gid since (seteuid), the open is
    // checked, and a creation owned, under the current ones through a session of
    // those, then the handle is taken in the process session.
    let process = esem(process_client())?;
    let mut created = None;
    if !process.same_credentials() {
        let now = esem(Client::connect())?;
        created = Some(Semaphore::open_check(&now, &name, &opts).map_err(errno)?);
        opts.create = false;
        opts.exclusive = false;
    }
    let sem = Semaphore::open(&name, &opts).map_err(errno)?;
    if !created.unwrap_or(sem.created()) {
        // Opened before in this process, and the very semaphore (the service's sem_id
        // says so): the same sem_t, as glibc returns the same mapping (programs and
        // conformance tests compare the pointers). The name alone is not enough: it
        // may have been unlinked and created again by another process meanwhile.
        let id = sem.sem_id();
        if let Some(p) = table(|t| match t.names.get_mut(&name) {
            Some(e) if e.2 == id => {
                e.1 += 1;
                Some(e.0)
            }
            _ => None,
        }) {
            let _ = sem.close(); // the first open's handle serves both
            return Ok(p as *mut sem_t);
        }
    }
    let token = sem.token().map_err(errno)?;
    // Another semaphore than the one this process has under the name (created anew,
    // here or by another process after an unlink): the old sem_t is of a semaphore
    // whose name was unlinked; it keeps working until closed, as glibc's mapping does.
    let sem_id = sem.sem_id();
    table(|t| {
        if let Some((p, count, _)) = t.names.remove(&name) {
            *t.unlinked.entry(p).or_insert(0) += count;
        }
    });
    let cell = Box::new(SemCell {
        magic: MAGIC,
        token,
        pid: std::process::id(),
        kind: KIND_NAMED,
    });
    // Never freed: a sem_t pointer a program keeps after sem_close must stay readable
    // (its magic is cleared, so it is refused, not followed).
    let p = Box::into_raw(cell) as *mut sem_t;
    table(|t| {
        t.sems.insert(token, Arc::new(sem));
        t.names.insert(name.clone(), (p as usize, 1, sem_id));
        t.esem_names.insert(name);
    });
    Ok(p)
}

#[no_mangle]
pub unsafe extern "C" fn sem_close(s: *mut sem_t) -> c_int {
    if cell_of(s).is_none() {
        return match real_fn!(
            REAL_CLOSE,
            c"sem_close",
            unsafe extern "C" fn(*mut sem_t) -> c_int
        ) {
            // SAFETY: glibc's sem_close on the caller's pointer.
            Some(f) => unsafe { f(s) },
            None => c_result(Err(libc::ENOSYS)),
        };
    }
    c_result(guarded(|| {
        let cell = cell_of(s).ok_or(libc::EINVAL)?;
        if cell.kind != KIND_NAMED {
            return Err(libc::EINVAL);
        }
        let token = cell.token;
        let last = table(|t| {
            let name = t
                .names
                .iter()
                .find(|(_, e)| e.0 == s as usize)
                .map(|(n, _)| n.clone());
            match name {
                Some(n) => {
                    let e = t.names.get_mut(&n).map(|e| {
                        e.1 -= 1;
                        e.1
                    });
                    if e == Some(0) {
                        t.names.remove(&n);
                        return t.sems.remove(&token);
                    }
                    None
                }
                None => match t.unlinked.get_mut(&(s as usize)) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        None
                    }
                    Some(_) => {
                        t.unlinked.remove(&(s as usize));
                        t.sems.remove(&token)
                    }
                    None => t.sems.remove(&token), // inherited, never opened here
                },
            }
        });
        if let Some(sem) = last {
            clear(s);
            esem(sem.close())?;
        }
        Ok(())
    }))
}

#[no_mangle]
pub unsafe extern "C" fn sem_unlink(name: *const c_char) -> c_int {
    setup();
    let ours = ALL.load(Ordering::Acquire)
        || name_of(name).is_ok_and(|n| table(|t| t.esem_names.contains(&n)));
    if !ours {
        return match real_fn!(
            REAL_UNLINK,
            c"sem_unlink",
            unsafe extern "C" fn(*const c_char) -> c_int
        ) {
            // SAFETY: glibc's sem_unlink with the caller's name.
            Some(f) => unsafe { f(name) },
            None => c_result(Err(libc::ENOSYS)),
        };
    }
    c_result(guarded(|| unlink_esem(name, None)))
}

fn unlink_esem(name: *const c_char, key: Option<&[u8]>) -> Result<(), c_int> {
    // glibc's sem_unlink reports every name it cannot use as ENOENT, not EINVAL.
    let n = name_of(name).map_err(|_| libc::ENOENT)?;
    // Unlinking needs ownership under the current effective uid (see open_esem).
    let process = esem(process_client())?;
    let r = if process.same_credentials() {
        esem_client::unlink(&n, key)
    } else {
        Client::connect().and_then(|now| esem_client::unlink_via(&now, &n, key))
    };
    r.map_err(|e| match keyed_errno(&e, key.is_some()) {
        libc::EINVAL | libc::ENAMETOOLONG => libc::ENOENT,
        n => n,
    })?;
    table(|t| {
        if let Some((p, count, _)) = t.names.remove(&n) {
            *t.unlinked.entry(p).or_insert(0) += count;
        }
    });
    Ok(())
}

// ---------------------------------------------------------------- unnamed semaphores

static ANON: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub unsafe extern "C" fn sem_init(s: *mut sem_t, pshared: c_int, value: c_uint) -> c_int {
    setup();
    if !ALL.load(Ordering::Acquire) {
        return match real_fn!(
            REAL_INIT,
            c"sem_init",
            unsafe extern "C" fn(*mut sem_t, c_int, c_uint) -> c_int
        ) {
            // SAFETY: glibc's sem_init with the caller's arguments.
            Some(f) => unsafe { f(s, pshared, value) },
            None => c_result(Err(libc::ENOSYS)),
        };
    }
    c_result(guarded(|| {
        if s.is_null() || value > SEM_VALUE_MAX {
            return Err(libc::EINVAL);
        }
        let (sem, token) = new_unnamed(value)?;
        let cell = SemCell {
            magic: MAGIC,
            token,
            pid: std::process::id(),
            kind: if pshared == 0 {
                KIND_PRIVATE
            } else {
                KIND_UNNAMED
            },
        };
        // SAFETY: the caller's sem_t: 32 bytes, aligned for it.
        unsafe { std::ptr::write(s as *mut SemCell, cell) };
        table(|t| {
            if pshared == 0 {
                t.private.insert(token);
            }
            t.sems.insert(token, Arc::new(sem))
        });
        Ok(())
    }))
}

/// A new unnamed e-semaphore and its token. The service keeps only named semaphores:
/// this creates one under a name nobody else uses and unlinks it at once; the handle
/// keeps it alive, and other processes reach it through the token in the sem_t.
fn new_unnamed(value: c_uint) -> Result<(Semaphore, Handle), c_int> {
    let n = ANON.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("/esem.anon.{}.{n}.{nanos:x}", std::process::id());
    let opts = OpenOptions {
        create: true,
        exclusive: true,
        mode: 0o600,
        value,
        ..OpenOptions::default()
    };
    let sem = esem(Semaphore::open(&name, &opts))?;
    let _ = esem_client::unlink(&name, None);
    let token = esem(sem.token())?;
    Ok((sem, token))
}

#[no_mangle]
pub unsafe extern "C" fn sem_destroy(s: *mut sem_t) -> c_int {
    if cell_of(s).is_none() {
        return match real_fn!(
            REAL_DESTROY,
            c"sem_destroy",
            unsafe extern "C" fn(*mut sem_t) -> c_int
        ) {
            // SAFETY: glibc's sem_destroy on the caller's pointer.
            Some(f) => unsafe { f(s) },
            None => c_result(Err(libc::ENOSYS)),
        };
    }
    c_result(guarded(|| {
        let sem = lookup(s).ok_or(libc::EINVAL)?;
        let token = cell_of(s).ok_or(libc::EINVAL)?.token;
        table(|t| {
            t.private.remove(&token);
            t.sems.remove(&token)
        });
        clear(s);
        esem(sem.close())
    }))
}

// --------------------------------------------------------------------- operations

macro_rules! forward1 {
    ($slot:ident, $name:literal, $s:expr) => {
        match real_fn!($slot, $name, unsafe extern "C" fn(*mut sem_t) -> c_int) {
            // SAFETY: glibc's function on the caller's pointer.
            Some(f) => unsafe { f($s) },
            None => c_result(Err(libc::ENOSYS)),
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn sem_post(s: *mut sem_t) -> c_int {
    if cell_of(s).is_none() {
        return forward1!(REAL_POST, c"sem_post", s);
    }
    if DEPTH.with(StdCell::get) != 0 {
        // A signal handler interrupted this library on this thread: owe the post.
        return if defer_post(s) {
            0
        } else {
            c_result(Err(libc::EAGAIN))
        };
    }
    c_result(guarded(|| esem(lookup(s).ok_or(libc::EINVAL)?.post())))
}

#[no_mangle]
pub unsafe extern "C" fn sem_trywait(s: *mut sem_t) -> c_int {
    if cell_of(s).is_none() {
        return forward1!(REAL_TRYWAIT, c"sem_trywait", s);
    }
    c_result(guarded(|| esem(lookup(s).ok_or(libc::EINVAL)?.try_wait())))
}

#[no_mangle]
pub unsafe extern "C" fn sem_getvalue(s: *mut sem_t, sval: *mut c_int) -> c_int {
    if cell_of(s).is_none() {
        return match real_fn!(
            REAL_GETVALUE,
            c"sem_getvalue",
            unsafe extern "C" fn(*mut sem_t, *mut c_int) -> c_int
        ) {
            // SAFETY: glibc's sem_getvalue with the caller's pointers.
            Some(f) => unsafe { f(s, sval) },
            None => c_result(Err(libc::ENOSYS)),
        };
    }
    c_result(guarded(|| {
        if sval.is_null() {
            return Err(libc::EINVAL);
        }
        let v = esem(lookup(s).ok_or(libc::EINVAL)?.value())?;
        // SAFETY: the caller's int, as the API requires.
        unsafe { *sval = v as c_int };
        Ok(())
    }))
}

// ------------------------------------------------------ the waits (in shim.c)

extern "C" {
    fn esem_c_sem_wait(s: *mut sem_t) -> c_int;
    fn esem_c_sem_timedwait(s: *mut sem_t, abstime: *const timespec) -> c_int;
    fn esem_c_sem_clockwait(s: *mut sem_t, clock: clockid_t, abstime: *const timespec) -> c_int;
    fn esem_c_pthread_create(
        t: *mut libc::pthread_t,
        attr: *const libc::pthread_attr_t,
        f: extern "C" fn(*mut c_void) -> *mut c_void,
        arg: *mut c_void,
    ) -> c_int;
}

/// Exports one of shim.c's waits under the POSIX name. A naked function is a single
/// jump: no Rust frame exists while the C code runs, so a cancellation that unwinds
/// from its `poll` crosses only C frames. (A cdylib exports only Rust symbols, hence
/// this entry point rather than exporting the C one directly.)
macro_rules! export_c_wait {
    ($name:ident, $target:ident, ($($arg:ident: $ty:ty),*)) => {
        #[unsafe(naked)]
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> c_int {
            #[cfg(target_arch = "x86_64")]
            core::arch::naked_asm!("jmp {f}", f = sym $target);
            #[cfg(target_arch = "aarch64")]
            core::arch::naked_asm!("b {f}", f = sym $target);
        }
    };
}

export_c_wait!(sem_wait, esem_c_sem_wait, (s: *mut sem_t));
export_c_wait!(sem_timedwait, esem_c_sem_timedwait, (s: *mut sem_t, abstime: *const timespec));
// Counts the program's threads, so that the process ends with its last one (shim.c).
export_c_wait!(pthread_create, esem_c_pthread_create, (t: *mut libc::pthread_t, attr: *const libc::pthread_attr_t, f: extern "C" fn(*mut c_void) -> *mut c_void, arg: *mut c_void));
export_c_wait!(sem_clockwait, esem_c_sem_clockwait, (s: *mut sem_t, clock: clockid_t, abstime: *const timespec));

// ------------------------------------------------- the waits' Rust steps (shim.c)

const ESEM_PENDING: c_int = 0;
const ESEM_DONE: c_int = 1;
const MODE_BLOCK: c_int = 1;
const MODE_TIMED: c_int = 2;

/// Whether the calling thread is the client creating its own reader thread (shim.c
/// leaves that one out of the program's thread count).
#[no_mangle]
pub extern "C" fn esem_shim_own_thread() -> c_int {
    c_int::from(esem_client::spawning_own_thread())
}

/// Whether the client has a thread in this process (shim.c ends the process with the
/// program's last thread only then; otherwise glibc does so itself).
#[no_mangle]
pub extern "C" fn esem_shim_has_own_thread() -> c_int {
    c_int::from(esem_client::has_own_thread())
}

/// A shim step's result: ESEM_PENDING, ESEM_DONE, or a negative errno.
fn step(r: Result<c_int, c_int>) -> c_int {
    r.unwrap_or_else(|e| -e)
}

#[no_mangle]
pub extern "C" fn esem_shim_ours(s: *const sem_t) -> c_int {
    c_int::from(cell_of(s).is_some())
}

fn relative_ns(abstime: *const timespec, clock: clockid_t) -> Result<Option<u64>, c_int> {
    if clock != libc::CLOCK_REALTIME && clock != libc::CLOCK_MONOTONIC {
        return Err(libc::EINVAL);
    }
    if abstime.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's timespec, as the API requires.
    let t = unsafe { *abstime };
    if !(0..1_000_000_000).contains(&t.tv_nsec) {
        return Ok(None); // EINVAL, but only if the wait would block (POSIX)
    }
    let mut now = timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current time of `clock` into `now`.
    unsafe { libc::clock_gettime(clock, &mut now) };
    let ns = |x: &timespec| i128::from(x.tv_sec) * 1_000_000_000 + i128::from(x.tv_nsec);
    let rel = (ns(&t) - ns(&now)).clamp(0, (1i128 << 63) - 1);
    Ok(Some(rel as u64))
}

#[no_mangle]
pub unsafe extern "C" fn esem_shim_begin(
    s: *mut sem_t,
    mode: c_int,
    abstime: *const timespec,
    clock: clockid_t,
    req: *mut u64,
    wake: *mut c_int,
    client: *mut *const c_void,
) -> c_int {
    step(guarded(|| {
        let sem = lookup(s).ok_or(libc::EINVAL)?;
        let (wmode, timeout_ns) = match mode {
            MODE_BLOCK => (WaitMode::BLOCK, 0),
            MODE_TIMED => match relative_ns(abstime, clock)? {
                Some(ns) => (WaitMode::TIMED, ns),
                None => {
                    // An invalid abstime: success if a unit is free, else EINVAL.
                    return match sem.try_wait() {
                        Ok(()) => Ok(ESEM_DONE),
                        Err(e) if e.status() == Some(Status::EAGAIN) => Err(libc::EINVAL),
                        Err(e) => Err(errno_of(&e)),
                    };
                }
            },
            _ => return Err(libc::EINVAL),
        };
        let fd = esem(my_wake_fd())?;
        let (session, id) = esem(sem.start_wait(wmode, timeout_ns))?;
        // SAFETY: shim.c passes pointers to its own locals.
        unsafe {
            *req = id;
            *wake = fd;
            *client = session as *const Client as *const c_void;
        }
        Ok(ESEM_PENDING)
    }))
}

fn finished(r: Option<esem_client::Result<esem_proto::Reply>>) -> Result<c_int, c_int> {
    match r {
        None => Ok(ESEM_PENDING),
        Some(Ok(reply)) if reply.status == Status::OK => Ok(ESEM_DONE),
        Some(Ok(reply)) => Err(errno_of(&ClientError::Status {
            status: reply.status,
            message: String::new(),
        })),
        Some(Err(e)) => Err(errno_of(&e)),
    }
}

/// The session a wait was sent in, from the pointer `esem_shim_begin` gave shim.c.
/// Not `process_client()`: once that session has failed (a tampered frame, the service
/// gone), the process may have connected a new one, which knows nothing of this wait
/// (its answer would be a misleading EINVAL); the failed one answers with its failure.
fn session_of(client: *const c_void) -> Result<&'static Client, c_int> {
    if client.is_null() {
        return Err(libc::EINVAL);
    }
    // SAFETY: the pointer is a `&'static Client` from `start_wait` (process clients are
    // leaked, never freed), handed back unchanged by shim.c within the same wait.
    Ok(unsafe { &*(client as *const Client) })
}

#[no_mangle]
pub extern "C" fn esem_shim_poll(_s: *mut sem_t, req: u64, client: *const c_void) -> c_int {
    step(guarded(|| finished(session_of(client)?.try_reply(req))))
}

/// A signal interrupted the wait: withdraw it. `ESEM_DONE` if the grant won the race
/// (the caller has its unit and returns 0), else `-EINTR`.
#[no_mangle]
pub extern "C" fn esem_shim_interrupted(s: *mut sem_t, req: u64, client: *const c_void) -> c_int {
    step(guarded(|| {
        let sem = lookup(s).ok_or(libc::EINVAL)?;
        let client = session_of(client)?;
        if esem(sem.cancel_wait(client, req))? {
            Ok(ESEM_DONE)
        } else {
            Err(libc::EINTR)
        }
    }))
}

/// The thread is being cancelled in its wait: withdraw it, and give back a unit the
/// grant may have won meanwhile, so the dying thread takes nothing with it.
#[no_mangle]
pub extern "C" fn esem_shim_cancelled(s: *mut sem_t, req: u64, client: *const c_void) {
    let _ = guarded(|| {
        let sem = lookup(s).ok_or(libc::EINVAL)?;
        let client = session_of(client)?;
        if esem(sem.cancel_wait(client, req))? {
            esem(sem.post())?;
        }
        Ok(())
    });
}

/// The transport of this process's esem session, for tools: 2 the switchless rings, 1
/// the socket, 0 no session (none could be opened). Opens the session if there is none
/// yet. The benchmarks ask it through `dlsym`, so that no figure is labelled switchless
/// that ran over the socket (`ESEM_SWITCHLESS=1` alone falls back with a warning).
#[no_mangle]
pub extern "C" fn esem_transport() -> c_int {
    guarded(|| {
        Ok(match process_client() {
            Ok(c) if c.mode() == "switchless" => 2,
            Ok(_) => 1,
            Err(_) => 0,
        })
    })
    .unwrap_or(0)
}
