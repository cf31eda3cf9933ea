//! The native client against the real Python service. With `ESEM_SOCKET` set (the
//! pytest fixture does) it uses that service; otherwise it starts `python -m esem
//! serve` itself, with the interpreter from `ESEM_PYTHON`, the repository's `.venv`, or
//! `python3` (which must be able to import esem: this test fails, loudly, otherwise).

use esem_client::{process_client, unlink, ClientError, OpenOptions, Semaphore, HIGH_FD};
use esem_proto::Status;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Service {
    child: Option<Child>,
    _dir: Option<PathBuf>,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn service() -> Service {
    if std::env::var_os("ESEM_SOCKET").is_some() {
        return Service {
            child: None,
            _dir: None,
        };
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::env::var_os("ESEM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let venv = repo.join(".venv/bin/python");
            if venv.exists() {
                venv
            } else {
                PathBuf::from("python3")
            }
        });
    let dir = std::env::temp_dir().join(format!("esem-native-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("esem.sock");
    let child = Command::new(&python)
        .args(["-m", "esem", "serve", "--dir"])
        .arg(&dir)
        .arg("--socket")
        .arg(&sock)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} -m esem serve: {e}", python.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("esem.sock.pub").exists() {
        assert!(
            Instant::now() < deadline,
            "the Python service did not start (set ESEM_PYTHON)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::env::set_var("ESEM_SOCKET", &sock);
    Service {
        child: Some(child),
        _dir: Some(dir),
    }
}

fn name(tag: &str) -> String {
    let base = std::env::var("ESEM_TEST_NAME").unwrap_or_else(|_| "/esem-native-live".into());
    format!("{base}-{tag}-{}", std::process::id())
}

fn create(value: u32, key: Option<&[u8]>) -> OpenOptions {
    OpenOptions {
        create: true,
        exclusive: true,
        mode: 0o600,
        value,
        key: key.map(<[u8]>::to_vec),
        ..OpenOptions::default()
    }
}

#[test]
fn live_against_the_python_service() {
    let _svc = service();
    let client = process_client().expect("connect");
    assert!(esem_client::conn::session_fd(client) >= HIGH_FD);

    // Every operation.
    let n = name("ops");
    let s = Semaphore::open(&n, &create(1, None)).unwrap();
    assert!(s.created());
    s.try_wait().unwrap();
    assert_eq!(s.try_wait().unwrap_err().status(), Some(Status::EAGAIN));
    assert_eq!(
        s.timed_wait(Duration::from_millis(30))
            .unwrap_err()
            .status(),
        Some(Status::ETIMEDOUT)
    );
    s.post().unwrap();
    s.wait().unwrap();
    assert_eq!(s.value().unwrap(), 0);
    s.close().unwrap();
    assert_eq!(s.value().unwrap_err().status(), Some(Status::EBADF));
    unlink(&n, None).unwrap();
    assert_eq!(unlink(&n, None).unwrap_err().status(), Some(Status::ENOENT));

    // Key-bound: the key proves every operation; without it the open is refused.
    let key = b"a key of twenty-four by";
    let n = name("key");
    let s = Semaphore::open(&n, &create(0, Some(key))).unwrap();
    s.post().unwrap();
    let plain = OpenOptions {
        mode: 0o600,
        ..OpenOptions::default()
    };
    assert_eq!(
        Semaphore::open(&n, &plain).unwrap_err().status(),
        Some(Status::EKEYREJECTED)
    );
    let again = Semaphore::open(
        &n,
        &OpenOptions {
            key: Some(key.to_vec()),
            ..plain.clone()
        },
    )
    .unwrap();
    again.wait().unwrap();
    assert!(matches!(
        unlink(&n, None),
        Err(ClientError::Status {
            status: Status::EKEYREJECTED,
            ..
        })
    ));
    unlink(&n, Some(key)).unwrap();

    // Threads share the session: a thread blocked in a wait does not delay another
    // thread's operations, and a post from that other thread ends the wait.
    let blocked = Arc::new(Semaphore::open(&name("blocked"), &create(0, None)).unwrap());
    let busy = Semaphore::open(&name("busy"), &create(0, None)).unwrap();
    let waiter = {
        let b = Arc::clone(&blocked);
        std::thread::spawn(move || b.wait())
    };
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..200 {
        busy.post().unwrap();
        busy.try_wait().unwrap();
    }
    assert!(!waiter.is_finished(), "the wait ended without a post");
    blocked.post().unwrap();
    waiter.join().unwrap().unwrap();
    unlink(&name("blocked"), None).unwrap();
    unlink(&name("busy"), None).unwrap();
}
