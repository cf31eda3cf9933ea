//! `esem-floor ROUNDS [ECHO_CPU]`: the native floor of any socket design, for `esem bench
//! micro`.
//!
//! Two processes (a fork) over a Unix socketpair do ROUNDS request/reply round trips; each
//! message is a 32-byte payload sealed with ChaCha20-Poly1305 (the cipher of esem's Noise
//! channel, nonce = a per-direction counter as in Noise), sent as one length-prefixed
//! frame, read whole and opened (authenticated) on the other side. No protocol, no service:
//! what a native client and server could not go below. Prints one JSON object on stdout:
//! `{"samples_us": [...], "cpu_s": {"parent": S, "child": S}}` (each round trip's
//! latency, and each process's CPU over the timed rounds). The parent runs where it was
//! started (the bench pins it); with ECHO_CPU the echo process pins itself to that vCPU
//! (the bench's placement: the same vCPU, or the other one), else it inherits.

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Instant;

const PAYLOAD: usize = 32;
const TAG: usize = 16;
const FRAME: usize = 2 + PAYLOAD + TAG;

/// One direction of the channel: a key and its message counter.
struct Half {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl Half {
    fn new(key: [u8; 32]) -> Self {
        Half {
            aead: ChaCha20Poly1305::new(Key::from_slice(&key)),
            counter: 0,
        }
    }

    fn nonce(&mut self) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_le_bytes());
        self.counter += 1;
        *Nonce::from_slice(&n)
    }

    fn seal(&mut self, payload: &[u8; PAYLOAD], frame: &mut [u8; FRAME]) -> Result<(), String> {
        let nonce = self.nonce();
        frame[..2].copy_from_slice(&((PAYLOAD + TAG) as u16).to_be_bytes());
        frame[2..2 + PAYLOAD].copy_from_slice(payload);
        let tag = self
            .aead
            .encrypt_in_place_detached(&nonce, b"", &mut frame[2..2 + PAYLOAD])
            .map_err(|_| "seal failed".to_string())?;
        frame[2 + PAYLOAD..].copy_from_slice(&tag);
        Ok(())
    }

    fn open(&mut self, frame: &mut [u8; FRAME]) -> Result<(), String> {
        if u16::from_be_bytes([frame[0], frame[1]]) as usize != PAYLOAD + TAG {
            return Err("bad frame length".into());
        }
        let nonce = self.nonce();
        let (body, tag) = frame[2..].split_at_mut(PAYLOAD);
        self.aead
            .decrypt_in_place_detached(&nonce, b"", body, (&*tag).into())
            .map_err(|_| "a frame failed authentication".to_string())
    }
}

fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The keys of the two directions. A benchmark's: both processes know them, nobody else
/// listens on a socketpair, and the cost of the cipher does not depend on the key.
fn keys() -> ([u8; 32], [u8; 32]) {
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    for i in 0..32 {
        a[i] = i as u8;
        b[i] = 0xa5 ^ i as u8;
    }
    (a, b)
}

/// The echo side: open each request, seal a reply, for the warm-up round and ROUNDS more;
/// then send its CPU time over the rounds.
fn echo(mut sock: UnixStream, rounds: usize) -> Result<(), String> {
    let (up, down) = keys();
    let (mut rx, mut tx) = (Half::new(up), Half::new(down));
    let mut frame = [0u8; FRAME];
    let mut c0 = 0.0;
    for i in 0..=rounds {
        if i == 1 {
            c0 = cpu_seconds();
        }
        sock.read_exact(&mut frame).map_err(|e| e.to_string())?;
        rx.open(&mut frame)?;
        let mut reply = [0u8; PAYLOAD];
        reply.copy_from_slice(&frame[2..2 + PAYLOAD]);
        tx.seal(&reply, &mut frame)?;
        sock.write_all(&frame).map_err(|e| e.to_string())?;
    }
    let cpu = cpu_seconds() - c0;
    sock.write_all(&cpu.to_le_bytes())
        .map_err(|e| e.to_string())
}

fn client(mut sock: UnixStream, rounds: usize) -> Result<(Vec<f64>, f64, f64), String> {
    let (up, down) = keys();
    let (mut tx, mut rx) = (Half::new(up), Half::new(down));
    let mut frame = [0u8; FRAME];
    let payload = [0x78u8; PAYLOAD];
    let mut samples = Vec::with_capacity(rounds);
    let mut c0 = 0.0;
    for i in 0..=rounds {
        if i == 1 {
            c0 = cpu_seconds();
        }
        let t0 = Instant::now();
        tx.seal(&payload, &mut frame)?;
        sock.write_all(&frame).map_err(|e| e.to_string())?;
        sock.read_exact(&mut frame).map_err(|e| e.to_string())?;
        rx.open(&mut frame)?;
        if frame[2..2 + PAYLOAD] != payload {
            return Err("the reply is not the request".into());
        }
        if i > 0 {
            samples.push(t0.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    let cpu = cpu_seconds() - c0;
    let mut child = [0u8; 8];
    sock.read_exact(&mut child).map_err(|e| e.to_string())?;
    Ok((samples, cpu, f64::from_le_bytes(child)))
}

/// Pin the calling process to one vCPU.
fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it, and
    // sched_setaffinity reads size_of::<cpu_set_t>() bytes from a valid pointer.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

fn run(rounds: usize, echo_cpu: Option<usize>) -> Result<String, String> {
    let (a, b) = UnixStream::pair().map_err(|e| e.to_string())?;
    // SAFETY: this process has one thread here, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(a);
        let code = match echo_cpu.map_or(Ok(()), pin).and_then(|()| echo(b, rounds)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("esem-floor echo: {e}");
                1
            }
        };
        // SAFETY: the child leaves without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(b);
    let result = client(a, rounds);
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let (samples, parent, child) = result?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("the echo process failed (status {status})"));
    }
    let list: Vec<String> = samples.iter().map(|s| format!("{s:.3}")).collect();
    Ok(format!(
        "{{\"samples_us\": [{}], \"cpu_s\": {{\"parent\": {parent:.9}, \"child\": {child:.9}}}}}",
        list.join(", ")
    ))
}

fn main() -> ExitCode {
    let usage = || {
        eprintln!("usage: esem-floor ROUNDS [ECHO_CPU]");
        ExitCode::from(2)
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.first().map(|s| s.parse::<usize>()) {
        Some(Ok(n)) if n > 0 => n,
        _ => return usage(),
    };
    let echo_cpu = match args.get(1).map(|s| s.parse::<usize>()) {
        None => None,
        Some(Ok(cpu)) if cpu < libc::CPU_SETSIZE as usize => Some(cpu),
        Some(_) => return usage(),
    };
    if args.len() > 2 {
        return usage();
    }
    match run(rounds, echo_cpu) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("esem-floor: {e}");
            ExitCode::FAILURE
        }
    }
}
