//! Channel cryptography (PROTOCOL.md 3, 4, 8): the Noise NK handshake and its transport
//! through `snow` (`Noise_NK_25519_ChaChaPoly_BLAKE2s`, prologue `esem/1`), and the
//! key-binding MACs (keyed BLAKE2s-256 from `blake2`, verified in constant time).
//! Nothing here is hand-written cryptography. Every authentication failure is the
//! same opaque `Integrity` error.

use crate::consts::{
    Direction, AEAD_TAG_BYTES, KEY_BYTES, LENGTH_BYTES, MAC_BYTES, MAC_DOMAIN, MAX_FRAME_BODY,
    NOISE_MSG_BYTES, NOISE_PROLOGUE, NOISE_PROTOCOL_NAME, NOISE_WELCOME_BYTES, RESUME_SECRET_BYTES,
};
use crate::error::{Error, Result};
use blake2::digest::{CtOutput, Mac as _};
use blake2::{Blake2s256, Blake2sMac256, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};

/// The 32-byte Noise handshake hash: unique per session, known only to its two ends.
pub type SessionId = [u8; 32];
/// A session's resumption secret R (the WELCOME's payload).
pub type ResumeSecret = [u8; RESUME_SECRET_BYTES];

fn builder() -> snow::Builder<'static> {
    // The name is a constant this crate's tests parse; it cannot fail at run time.
    let params = NOISE_PROTOCOL_NAME
        .parse()
        .expect("valid Noise protocol name");
    snow::Builder::new(params)
}

/// The established transport: the two cipher states of `Split()` and the session id.
pub struct Transport {
    state: snow::TransportState,
    session_id: SessionId,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("sending_nonce", &self.state.sending_nonce())
            .field("receiving_nonce", &self.state.receiving_nonce())
            .finish_non_exhaustive()
    }
}

impl Transport {
    fn from_handshake(hs: snow::HandshakeState) -> Result<Self> {
        let mut session_id = [0u8; 32];
        let h = hs.get_handshake_hash();
        if h.len() != 32 {
            return Err(Error::integrity("handshake failed"));
        }
        session_id.copy_from_slice(h);
        let state = hs
            .into_transport_mode()
            .map_err(|_| Error::integrity("handshake failed"))?;
        Ok(Transport { state, session_id })
    }

    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// Seal one message under the next sending nonce. The caller has checked the size
    /// (an oversized message is refused before this, since sealing uses up a nonce).
    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<Vec<u8>> {
        if plaintext.len() + AEAD_TAG_BYTES > MAX_FRAME_BODY {
            return Err(Error::misuse("message too large"));
        }
        let mut out = vec![0u8; plaintext.len() + AEAD_TAG_BYTES];
        let n = self
            .state
            .write_message(plaintext, &mut out)
            .map_err(|_| Error::integrity("session nonces exhausted"))?;
        out.truncate(n);
        Ok(out)
    }

    /// Open one message under the next receiving nonce; any failure is one opaque error.
    pub fn decrypt(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>> {
        if ciphertext.len() < AEAD_TAG_BYTES || ciphertext.len() > MAX_FRAME_BODY {
            return Err(Error::integrity("frame failed authentication"));
        }
        let mut out = vec![0u8; ciphertext.len()];
        let n = self
            .state
            .read_message(ciphertext, &mut out)
            .map_err(|_| Error::integrity("frame failed authentication"))?;
        out.truncate(n);
        Ok(out)
    }
}

/// Client side of NK: pins the service's static public key.
pub struct Initiator {
    hs: snow::HandshakeState,
}

impl Initiator {
    pub fn new(service_public: &[u8]) -> Result<Self> {
        Self::build(service_public, None)
    }

    /// An initiator whose ephemeral key is fixed, so that two implementations can be
    /// compared byte for byte. Tests only: a fixed ephemeral key destroys secrecy.
    #[cfg(feature = "deterministic")]
    pub fn new_with_fixed_ephemeral_for_testing(
        service_public: &[u8],
        ephemeral: &[u8],
    ) -> Result<Self> {
        Self::build(service_public, Some(ephemeral))
    }

    fn build(service_public: &[u8], ephemeral: Option<&[u8]>) -> Result<Self> {
        if service_public.len() != KEY_BYTES {
            return Err(Error::misuse(format!(
                "service public key must be {KEY_BYTES} bytes"
            )));
        }
        let mut b = builder()
            .prologue(NOISE_PROLOGUE)
            .and_then(|b| b.remote_public_key(service_public))
            .map_err(|e| Error::misuse(format!("noise setup: {e}")))?;
        if let Some(e) = ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let hs = b
            .build_initiator()
            .map_err(|e| Error::misuse(format!("noise setup: {e}")))?;
        Ok(Initiator { hs })
    }

    /// NK message 1 (`-> e, es`), empty payload: 48 bytes.
    pub fn hello(&mut self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; NOISE_MSG_BYTES];
        let n = self
            .hs
            .write_message(&[], &mut out)
            .map_err(|e| Error::misuse(format!("noise: {e}")))?;
        out.truncate(n);
        Ok(out)
    }

    /// Read NK message 2 (`<- e, ee`); only the holder of the pinned key can make it.
    /// Its payload is the new session's resumption secret R, exactly 32 bytes: any
    /// other length is refused like a forged WELCOME.
    pub fn finish(mut self, welcome: &[u8]) -> Result<(Transport, ResumeSecret)> {
        let fail = || Error::integrity("service failed to prove its pinned identity");
        if welcome.len() != NOISE_WELCOME_BYTES {
            return Err(fail());
        }
        let mut payload = [0u8; NOISE_WELCOME_BYTES];
        let n = self
            .hs
            .read_message(welcome, &mut payload)
            .map_err(|_| fail())?;
        if n != RESUME_SECRET_BYTES || !self.hs.is_handshake_finished() {
            return Err(fail());
        }
        let mut secret = [0u8; RESUME_SECRET_BYTES];
        secret.copy_from_slice(&payload[..RESUME_SECRET_BYTES]);
        Ok((Transport::from_handshake(self.hs)?, secret))
    }
}

/// Service side of NK (used by this crate's tests and the interop tool).
pub struct Responder {
    hs: snow::HandshakeState,
}

impl Responder {
    pub fn new(static_private: &[u8]) -> Result<Self> {
        if static_private.len() != KEY_BYTES {
            return Err(Error::misuse(format!(
                "service private key must be {KEY_BYTES} bytes"
            )));
        }
        let hs = builder()
            .prologue(NOISE_PROLOGUE)
            .and_then(|b| b.local_private_key(static_private))
            .and_then(|b| b.build_responder())
            .map_err(|e| Error::misuse(format!("noise setup: {e}")))?;
        Ok(Responder { hs })
    }

    /// Read HELLO, write WELCOME carrying the new session's resumption secret.
    pub fn respond(mut self, hello: &[u8], secret: &ResumeSecret) -> Result<(Vec<u8>, Transport)> {
        let fail = || Error::integrity("handshake failed");
        if hello.len() != NOISE_MSG_BYTES {
            return Err(fail());
        }
        let mut payload = [0u8; NOISE_MSG_BYTES];
        let n = self
            .hs
            .read_message(hello, &mut payload)
            .map_err(|_| fail())?;
        if n != 0 {
            return Err(Error::integrity("unexpected handshake payload"));
        }
        let mut out = vec![0u8; NOISE_WELCOME_BYTES];
        let n = self
            .hs
            .write_message(secret, &mut out)
            .map_err(|_| fail())?;
        out.truncate(n);
        Ok((out, Transport::from_handshake(self.hs)?))
    }
}

/// The public X25519 key of a private one (for tests and tools).
pub fn generate_keypair() -> Result<([u8; 32], [u8; 32])> {
    let kp = builder()
        .generate_keypair()
        .map_err(|e| Error::misuse(format!("{e}")))?;
    let mut private = [0u8; 32];
    let mut public = [0u8; 32];
    private.copy_from_slice(&kp.private);
    public.copy_from_slice(&kp.public);
    Ok((private, public))
}

/// `V = BLAKE2s-256(R)` (unkeyed): what the service keeps of a resumption secret.
pub fn resume_verifier(secret: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Blake2s256::digest(secret));
    out
}

/// Constant-time check that `secret` is the R behind `verifier`.
pub fn verifier_matches(verifier: &[u8; 32], secret: &[u8]) -> bool {
    let ours: CtOutput<Blake2s256> = CtOutput::new(Blake2s256::digest(secret));
    let theirs: CtOutput<Blake2s256> = CtOutput::new((*verifier).into());
    ours == theirs // `subtle`'s constant-time comparison
}

fn mac_state(key: &[u8], session_id: &SessionId, direction: Direction) -> Result<Blake2sMac256> {
    let mut m = Blake2sMac256::new_from_slice(key)
        .map_err(|_| Error::misuse("key-binding key longer than 32 bytes"))?;
    m.update(MAC_DOMAIN);
    m.update(session_id);
    m.update(&[direction.wire()]);
    Ok(m)
}

/// `BLAKE2s-256(key=K, MAC_DOMAIN || session_id || direction || message)` (PROTOCOL.md 8.1).
pub fn keybind_mac(
    key: &[u8],
    session_id: &SessionId,
    direction: Direction,
    message: &[u8],
) -> Result<[u8; MAC_BYTES]> {
    let mut m = mac_state(key, session_id, direction)?;
    m.update(message);
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

/// `Integrity` unless `mac` is present and is the MAC of `message` (constant-time).
pub fn verify_keybind_mac(
    key: &[u8],
    session_id: &SessionId,
    direction: Direction,
    message: &[u8],
    mac: Option<&[u8; MAC_BYTES]>,
) -> Result<()> {
    let fail = || Error::integrity("key-binding MAC did not verify");
    let mac = mac.ok_or_else(fail)?;
    let mut m = mac_state(key, session_id, direction).map_err(|_| fail())?;
    m.update(message);
    m.verify_slice(mac).map_err(|_| fail())
}

/// One direction of an established Noise transport, rebuilt from its `k` and `n` (the
/// spec's CipherState after `Split()`): `ENCRYPT(k, n++, ad="", plaintext)` with the
/// nonce `0u32 || n as u64 little-endian` (Noise spec 5.1, 12.3). For a transport whose
/// handshake ran in another implementation (the Python service keeps `noiseprotocol`
/// for the handshake and hands the keys over); the wire is identical to `Transport`'s.
pub struct CipherState {
    aead: ChaCha20Poly1305,
    n: u64,
}

impl std::fmt::Debug for CipherState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CipherState")
            .field("n", &self.n)
            .finish_non_exhaustive()
    }
}

impl CipherState {
    pub fn new(key: &[u8], n: u64) -> Result<Self> {
        if key.len() != KEY_BYTES {
            return Err(Error::misuse(format!(
                "transport key must be {KEY_BYTES} bytes"
            )));
        }
        Ok(CipherState {
            // Qualified: blake2's `Mac` also has a `new_from_slice`.
            aead: <ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(Key::from_slice(key)),
            n,
        })
    }

    /// The next nonce counter.
    pub fn nonce(&self) -> u64 {
        self.n
    }

    /// Use up the next nonce: Noise reserves 2^64-1, so a session that reaches it must
    /// end (the same error as Python's `Transport`).
    fn next(&mut self) -> Result<Nonce> {
        if self.n == u64::MAX {
            return Err(Error::integrity("session nonces exhausted"));
        }
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.n.to_le_bytes());
        Ok(Nonce::from(nonce))
    }

    /// Append `frame(ENCRYPT(plaintext))` to `out`: the length prefix, the ciphertext
    /// and the tag, with no intermediate buffer. An oversized message is `Misuse` and
    /// uses up no nonce (the peer would be one counter behind for the rest of the session).
    pub fn seal_frame(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let body = plaintext.len() + AEAD_TAG_BYTES;
        if body > MAX_FRAME_BODY {
            return Err(Error::misuse(format!(
                "message of {} bytes exceeds {}",
                plaintext.len(),
                MAX_FRAME_BODY - AEAD_TAG_BYTES
            )));
        }
        let nonce = self.next()?;
        out.extend_from_slice(&(body as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(plaintext);
        match self
            .aead
            .encrypt_in_place_detached(&nonce, b"", &mut out[start..])
        {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                self.n += 1;
                Ok(())
            }
            Err(_) => {
                out.truncate(start - LENGTH_BYTES);
                Err(Error::misuse("message too large"))
            }
        }
    }

    /// `DECRYPT(ciphertext)` under the next nonce, which is used up only on success (a
    /// failure ends the session anyway). Any failure is the one opaque `Integrity` error.
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>> {
        let nonce = self.next()?;
        let fail = || Error::integrity("frame failed authentication");
        if ciphertext.len() < AEAD_TAG_BYTES {
            return Err(fail());
        }
        let split = ciphertext.len() - AEAD_TAG_BYTES;
        let mut plain = ciphertext[..split].to_vec();
        let tag = Tag::from_slice(&ciphertext[split..]);
        self.aead
            .decrypt_in_place_detached(&nonce, b"", &mut plain, tag)
            .map_err(|_| fail())?;
        self.n += 1;
        Ok(plain)
    }
}
