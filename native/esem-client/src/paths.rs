//! Where the service lives and which key to pin, exactly as `esem.paths` resolves them:
//! `ESEM_SOCKET`, else `ESEM_DIR`/esem.sock, else the default directory (`/run/esem`
//! for root, `$XDG_RUNTIME_DIR/esem`, `/tmp/esem-UID`); the key from `ESEM_PUBKEY`
//! (hex) or the `.pub` file beside the socket, after `check_published_key`.

use crate::sys::geteuid;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const SOCKET_NAME: &str = "esem.sock";
pub const PUB_SUFFIX: &str = ".pub";

pub fn default_dir() -> PathBuf {
    let uid = geteuid();
    if uid == 0 {
        return PathBuf::from("/run/esem");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(r) if !r.is_empty() => Path::new(&r).join("esem"),
        _ => PathBuf::from(format!("/tmp/esem-{uid}")),
    }
}

fn env_nonempty(k: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(k).filter(|v| !v.is_empty())
}

pub fn state_dir() -> PathBuf {
    env_nonempty("ESEM_DIR").map_or_else(default_dir, PathBuf::from)
}

pub fn socket_path() -> PathBuf {
    env_nonempty("ESEM_SOCKET").map_or_else(|| state_dir().join(SOCKET_NAME), PathBuf::from)
}

/// True when nobody chose the socket: neither `ESEM_SOCKET` nor `ESEM_DIR` is set.
pub fn is_default_location() -> bool {
    env_nonempty("ESEM_SOCKET").is_none() && env_nonempty("ESEM_DIR").is_none()
}

pub fn pubkey_path(sock: &Path) -> PathBuf {
    let mut name = sock
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(PUB_SUFFIX);
    sock.with_file_name(name)
}

/// Refuse a published key that someone other than its rightful writer could have put
/// there (adversary A5 squatting a path): the file and its directory writable by their
/// owner only; at the default location the directory must belong to root or to us;
/// the file to root, us, or the directory's owner. The one place these rules live in
/// this crate (they follow `esem.paths.check_published_key`).
pub fn check_published_key(sock: &Path, default_location: bool) -> Result<(), String> {
    let dir = sock.parent().unwrap_or(Path::new("."));
    let key = pubkey_path(sock);
    let d = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let k = std::fs::symlink_metadata(&key).map_err(|e| format!("{}: {e}", key.display()))?;
    if !k.file_type().is_file() {
        return Err(format!("{} is not a regular file", key.display()));
    }
    for (path, md) in [(dir, &d), (key.as_path(), &k)] {
        let mode = md.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by others (mode {:04o}); not trusting its key",
                path.display(),
                mode & 0o7777
            ));
        }
    }
    let me = geteuid();
    if default_location && d.uid() != 0 && d.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to root or to this user; set ESEM_SOCKET (and \
             ESEM_PUBKEY) to reach your service",
            dir.display(),
            d.uid()
        ));
    }
    if ![0, me, d.uid()].contains(&k.uid()) {
        return Err(format!(
            "{} belongs to uid {}, not to the owner of {}",
            key.display(),
            k.uid(),
            dir.display()
        ));
    }
    Ok(())
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("service public key is not hex".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// The service key to pin: `ESEM_PUBKEY` (hex), or the checked file beside the socket.
pub fn read_pubkey(sock: &Path, default_location: bool) -> Result<[u8; 32], String> {
    match std::env::var("ESEM_PUBKEY") {
        Ok(v) => key_from_hex(&v),
        Err(_) => read_published_key(sock, default_location),
    }
}

/// Whether the key to pin comes from `ESEM_PUBKEY` rather than the published file.
pub fn pubkey_from_env() -> bool {
    std::env::var_os("ESEM_PUBKEY").is_some()
}

/// The published key file beside the socket, checked, without looking at the
/// environment (the client's reader thread re-reads it when it reconnects, and must not
/// call `getenv` while the program may be calling `setenv`).
pub fn read_published_key(sock: &Path, default_location: bool) -> Result<[u8; 32], String> {
    check_published_key(sock, default_location)?;
    let p = pubkey_path(sock);
    key_from_hex(&std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?)
}

fn key_from_hex(hex: &str) -> Result<[u8; 32], String> {
    let raw = parse_hex(hex)?;
    raw.as_slice()
        .try_into()
        .map_err(|_| format!("service public key must be 32 bytes, got {}", raw.len()))
}
