//! E-semaphores over the process client: open, wait, trywait, timedwait, post,
//! getvalue, close, unlink, key-bound included; a handle inherited across `fork`
//! re-attaches lazily through the child's own session (PROTOCOL.md 12).

use crate::conn::{fork_connect_failure, process_client, Client};
use crate::error::{ClientError, Result};
use crate::sys;
use esem_proto::consts::{open_flag, KEY_MAX_BYTES, KEY_MIN_BYTES, MAX_NAME_BYTES, SEM_VALUE_MAX};
use esem_proto::{Handle, ReplyBody, RequestBody, Status, WaitMode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// `O_CREAT`-style options of `Semaphore::open`.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub create: bool,
    pub exclusive: bool,
    /// esem extension: a dead holder's units are released.
    pub robust: bool,
    pub mode: u32,
    pub value: u32,
    /// Key-binding key (16..32 bytes): binds a new semaphore, proves an existing one.
    pub key: Option<Vec<u8>>,
}

/// Check a name the way the service will (so a bad one is refused before sending).
pub fn check_name(name: &str) -> Result<()> {
    let bad = |m: String| Err(ClientError::Invalid(m));
    if !name.starts_with('/') {
        return bad(format!("semaphore name {name:?} must start with '/'"));
    }
    if name[1..].contains('/') {
        return bad(format!("semaphore name {name:?} may contain only one '/'"));
    }
    if name.len() == 1 {
        return bad("semaphore name must have characters after '/'".into());
    }
    if name.contains('\0') {
        return bad(format!("semaphore name {name:?} contains a NUL byte"));
    }
    if name.len() - 1 > MAX_NAME_BYTES {
        return Err(ClientError::Status {
            status: Status::ENAMETOOLONG,
            message: format!(
                "semaphore name is {} bytes after '/', at most {MAX_NAME_BYTES}",
                name.len() - 1
            ),
        });
    }
    Ok(())
}

fn check_key(key: Option<&[u8]>) -> Result<()> {
    match key {
        Some(k) if !(KEY_MIN_BYTES..=KEY_MAX_BYTES).contains(&k.len()) => {
            Err(ClientError::Invalid(format!(
                "key is {} bytes; a key-binding key has {KEY_MIN_BYTES} to {KEY_MAX_BYTES}",
                k.len()
            )))
        }
        _ => Ok(()),
    }
}

/// An open handle on an e-semaphore. Thread-safe.
#[derive(Debug)]
pub struct Semaphore {
    name: String,
    key: Option<Vec<u8>>,
    created: bool,
    /// The service's identity of the semaphore (OPEN/ATTACH replies; 0 until a
    /// `from_token` semaphore has attached).
    sem_id: AtomicU64,
    /// (pid, handle): the handle is valid in that process's session only.
    /// (pid, handle, session): the handle is valid in that process's session only,
    /// and dies with it: once that session has failed, the process's next session
    /// does not know the handle, and the operations report the failure.
    token: Mutex<Option<(u32, Handle, Option<&'static Client>)>>,
}

impl Semaphore {
    /// `sem_open`: open (or create) a named e-semaphore.
    pub fn open(name: &str, opts: &OpenOptions) -> Result<Semaphore> {
        let body = Self::open_body(name, opts)?;
        let client = process_client()?;
        let (handle, created, sem_id) = Self::open_reply(client.call(&body, opts.key.as_deref())?)?;
        Ok(Semaphore {
            name: name.to_owned(),
            key: opts.key.clone(),
            created,
            sem_id: AtomicU64::new(sem_id),
            token: Mutex::new(Some((crate::sys::pid(), handle, Some(client)))),
        })
    }

    /// OPEN through `client`'s session only for the service's answer: whether it is
    /// allowed (permission checked against that session's credentials) and whether it
    /// created the semaphore. The handle is `client`'s and ends with its session.
    pub fn open_check(client: &Client, name: &str, opts: &OpenOptions) -> Result<bool> {
        let body = Self::open_body(name, opts)?;
        Ok(Self::open_reply(client.call(&body, opts.key.as_deref())?)?.1)
    }

    fn open_reply(reply: esem_proto::Reply) -> Result<(Handle, bool, u64)> {
        let ReplyBody::Handle {
            handle,
            created,
            sem_id,
        } = reply.body
        else {
            return Err(ClientError::Unavailable(
                "OPEN reply without a handle".into(),
            ));
        };
        Ok((handle, created, sem_id))
    }

    fn open_body(name: &str, opts: &OpenOptions) -> Result<RequestBody> {
        check_name(name)?;
        check_key(opts.key.as_deref())?;
        if opts.create && opts.value > SEM_VALUE_MAX {
            return Err(ClientError::Invalid(format!(
                "initial value {} above {SEM_VALUE_MAX}",
                opts.value
            )));
        }
        if opts.create && opts.mode > 0o7777 {
            return Err(ClientError::Invalid(format!(
                "mode {:o} out of range",
                opts.mode
            )));
        }
        let mut oflag = 0;
        if opts.create {
            oflag |= open_flag::CREAT;
        }
        if opts.exclusive {
            oflag |= open_flag::EXCL;
        }
        if opts.robust {
            oflag |= open_flag::ROBUST;
        }
        let mode = if opts.create {
            opts.mode & !sys::current_umask() & 0o7777
        } else {
            0
        };
        let body = RequestBody::Open {
            oflag,
            mode: mode as u16,
            value: if opts.create { opts.value } else { 0 },
            // The key travels only when creating; an existing one is proved by the MAC.
            key: if opts.create { opts.key.clone() } else { None },
            name: name.to_owned(),
        };
        Ok(body)
    }

    /// A semaphore known only by a handle token of another process (an unnamed
    /// semaphore in shared memory, or one inherited across fork): the first operation
    /// ATTACHes through this process's session.
    pub fn from_token(token: Handle, name: &str) -> Semaphore {
        Semaphore {
            name: name.to_owned(),
            key: None,
            created: false,
            sem_id: AtomicU64::new(0),
            token: Mutex::new(Some((0, token, None))),
        }
    }

    /// This process's handle token, attaching first if needed (what another process
    /// needs to `from_token` it).
    pub fn token(&self) -> Result<Handle> {
        self.ctx().map(|(_, h)| h)
    }

    /// Send a WAIT and return its request id without waiting: the caller sleeps on
    /// `conn::my_wake_fd()` and collects the reply with `Client::try_reply`.
    pub fn start_wait(&self, mode: WaitMode, timeout_ns: u64) -> Result<(&'static Client, u64)> {
        let (client, handle) = self.ctx()?;
        let id = client.send(
            &RequestBody::Wait {
                handle,
                mode,
                timeout_ns,
            },
            self.key.as_deref(),
        )?;
        Ok((client, id))
    }

    /// Withdraw the wait `req_id` (PROTOCOL.md 10): CANCEL, then both replies. Returns
    /// true if the grant won the race (the caller owns a unit), false if withdrawn.
    pub fn cancel_wait(&self, client: &Client, req_id: u64) -> Result<bool> {
        let cancel = client.send(&RequestBody::Cancel { target: req_id }, None)?;
        let fin = client.wait_reply(req_id, false)?;
        client.wait_reply(cancel, false)?;
        Ok(fin.status == Status::OK)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The service's identity of the semaphore (PROTOCOL.md 6.2): two handles with the
    /// same id are the same semaphore, whatever became of its name meanwhile.
    pub fn sem_id(&self) -> u64 {
        self.sem_id.load(Ordering::Relaxed)
    }

    /// True if this open created the semaphore.
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn key_bound(&self) -> bool {
        self.key.is_some()
    }

    /// The client and this process's handle, attaching first if the handle was
    /// inherited across fork.
    fn ctx(&self) -> Result<(&'static Client, Handle)> {
        let pid = crate::sys::pid();
        let mut token = self.token.lock().unwrap_or_else(|p| p.into_inner());
        match *token {
            None => Err(ClientError::Status {
                status: Status::EBADF,
                message: format!("semaphore {} has been closed", self.name),
            }),
            // The session the handle was issued in, failed or not: a failed one answers
            // with its failure (tampering: an integrity error; the service gone:
            // unavailable), where a newer session would only say "no such handle".
            Some((p, h, Some(owner))) if p == pid => Ok((owner, h)),
            Some((p, h, None)) if p == pid => Ok((process_client()?, h)),
            Some((_, ancestor, _)) => {
                let client = process_client()?;
                let reply = client
                    .call(
                        &RequestBody::Attach { handle: ancestor },
                        self.key.as_deref(),
                    )
                    .map_err(|e| match (e.status(), fork_connect_failure()) {
                        // Refused as unknown because this session is not the one the
                        // fork should have opened: say why that one is missing.
                        (Some(Status::EBADF), Some(cause)) => cause,
                        _ => e,
                    })?;
                let ReplyBody::Handle { handle, sem_id, .. } = reply.body else {
                    return Err(ClientError::Unavailable(
                        "ATTACH reply without a handle".into(),
                    ));
                };
                self.sem_id.store(sem_id, Ordering::Relaxed);
                *token = Some((pid, handle, Some(client)));
                Ok((client, handle))
            }
        }
    }

    fn wait_mode(&self, mode: WaitMode, timeout_ns: u64) -> Result<()> {
        let (client, handle) = self.ctx()?;
        client.call(
            &RequestBody::Wait {
                handle,
                mode,
                timeout_ns,
            },
            self.key.as_deref(),
        )?;
        Ok(())
    }

    /// `sem_wait`: block until a unit is granted (FIFO).
    pub fn wait(&self) -> Result<()> {
        self.wait_mode(WaitMode::BLOCK, 0)
    }

    /// `sem_trywait`: a unit now, or `Status EAGAIN`.
    pub fn try_wait(&self) -> Result<()> {
        self.wait_mode(WaitMode::TRY, 0)
    }

    /// `sem_timedwait` with a relative timeout: a unit, or `Status ETIMEDOUT`.
    pub fn timed_wait(&self, timeout: Duration) -> Result<()> {
        let ns = u64::try_from(timeout.as_nanos())
            .unwrap_or(u64::MAX)
            .min((1 << 63) - 1);
        self.wait_mode(WaitMode::TIMED, ns)
    }

    /// `sem_post`: release one unit (`Status EOVERFLOW` at SEM_VALUE_MAX).
    pub fn post(&self) -> Result<()> {
        let (client, handle) = self.ctx()?;
        client.call(&RequestBody::Post { handle }, self.key.as_deref())?;
        Ok(())
    }

    /// `sem_getvalue`: the count (0 while waiters queue).
    pub fn value(&self) -> Result<u32> {
        let (client, handle) = self.ctx()?;
        match client
            .call(&RequestBody::GetValue { handle }, self.key.as_deref())?
            .body
        {
            ReplyBody::Value(v) => Ok(v),
            _ => Err(ClientError::Unavailable(
                "GETVALUE reply without a value".into(),
            )),
        }
    }

    /// `sem_close`: close this process's handle.
    pub fn close(&self) -> Result<()> {
        let (client, handle) = self.ctx()?;
        client.call(&RequestBody::Close { handle }, self.key.as_deref())?;
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

/// `sem_unlink`: remove the name (with `key` for a key-bound semaphore).
pub fn unlink(name: &str, key: Option<&[u8]>) -> Result<()> {
    unlink_via(process_client()?, name, key)
}

/// `unlink` through `client`'s session (e.g. one opened under the process's current
/// credentials, when they are no longer those of the process session).
pub fn unlink_via(client: &Client, name: &str, key: Option<&[u8]>) -> Result<()> {
    check_name(name)?;
    check_key(key)?;
    client.call(
        &RequestBody::Unlink {
            name: name.to_owned(),
        },
        key,
    )?;
    Ok(())
}
