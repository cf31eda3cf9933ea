//! `CipherState`, the transport direction the service rebuilds from a handshake run
//! elsewhere: it is Noise's ChaChaPoly CipherState exactly (checked against snow's own
//! cipher for random keys, nonces and messages), a frame it seals opens only under the
//! same key and nonce, any change to the bytes fails as one opaque `Integrity` error, a
//! failure uses up no nonce, and the reserved last nonce is never used.

use esem_proto::consts::{AEAD_TAG_BYTES, LENGTH_BYTES, MAX_FRAME_BODY, MAX_PLAINTEXT};
use esem_proto::crypto::CipherState;
use esem_proto::frame::FrameDecoder;
use esem_proto::Error;
use proptest::prelude::*;
use snow::params::CipherChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

fn snow_seal(key: &[u8; 32], n: u64, plaintext: &[u8]) -> Vec<u8> {
    let mut c = DefaultResolver
        .resolve_cipher(&CipherChoice::ChaChaPoly)
        .expect("snow has ChaChaPoly");
    c.set(key);
    let mut out = vec![0u8; plaintext.len() + AEAD_TAG_BYTES];
    let len = c.encrypt(n, &[], plaintext, &mut out);
    out.truncate(len);
    out
}

fn body_of(frame: &[u8]) -> &[u8] {
    &frame[LENGTH_BYTES..]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn seals_what_snow_seals_and_opens_it(key in any::<[u8; 32]>(),
                                          n in prop_oneof![0u64..4, (u64::MAX - 4)..(u64::MAX - 1), any::<u64>()],
                                          plaintext in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assume!(n < u64::MAX);
        let mut tx = CipherState::new(&key, n).unwrap();
        let mut frame = Vec::new();
        tx.seal_frame(&plaintext, &mut frame).unwrap();
        prop_assert_eq!(tx.nonce(), n + 1);
        let body = body_of(&frame);
        let want = snow_seal(&key, n, &plaintext);
        prop_assert_eq!(body, want.as_slice());
        let frames = FrameDecoder::new().feed(&frame).unwrap();
        prop_assert_eq!(frames.len(), 1);
        let mut rx = CipherState::new(&key, n).unwrap();
        prop_assert_eq!(rx.open(&frames[0]).unwrap(), plaintext);
        prop_assert_eq!(rx.nonce(), n + 1);
    }

    #[test]
    fn any_change_fails_opaquely_and_keeps_the_nonce(key in any::<[u8; 32]>(),
                                                      plaintext in proptest::collection::vec(any::<u8>(), 0..100),
                                                      pos in any::<usize>(), flip in 1u8..=255,
                                                      cut in any::<usize>(), other_n in 1u64..1000) {
        let body = snow_seal(&key, 0, &plaintext);
        let mut flipped = body.clone();
        let i = pos % flipped.len();
        flipped[i] ^= flip;
        let truncated = &body[..cut % body.len()];
        let mut wrong_key = key;
        wrong_key[pos % 32] ^= flip;
        let cases: Vec<(Vec<u8>, [u8; 32], u64)> = vec![
            (flipped, key, 0),
            (truncated.to_vec(), key, 0),
            (body.clone(), wrong_key, 0),
            (body.clone(), key, other_n), // replayed or reordered: another counter
        ];
        for (bytes, k, n) in cases {
            let mut rx = CipherState::new(&k, n).unwrap();
            let err = rx.open(&bytes).unwrap_err();
            prop_assert_eq!(err, Error::Integrity("frame failed authentication".into()));
            prop_assert_eq!(rx.nonce(), n);
        }
    }
}

#[test]
fn the_reserved_last_nonce_is_never_used() {
    let key = [7u8; 32];
    let mut tx = CipherState::new(&key, u64::MAX).unwrap();
    let mut out = Vec::new();
    let err = tx.seal_frame(b"x", &mut out).unwrap_err();
    assert_eq!(err, Error::Integrity("session nonces exhausted".into()));
    assert!(out.is_empty());
    let mut rx = CipherState::new(&key, u64::MAX).unwrap();
    let body = snow_seal(&key, u64::MAX - 1, b"x");
    assert_eq!(
        rx.open(&body).unwrap_err(),
        Error::Integrity("session nonces exhausted".into())
    );
    // One before it is the last one usable.
    let mut last = CipherState::new(&key, u64::MAX - 1).unwrap();
    assert_eq!(last.open(&body).unwrap(), b"x");
}

#[test]
fn an_oversized_message_is_misuse_and_uses_no_nonce() {
    let mut tx = CipherState::new(&[1u8; 32], 5).unwrap();
    let mut out = b"kept".to_vec();
    let err = tx
        .seal_frame(&vec![0u8; MAX_PLAINTEXT + 1], &mut out)
        .unwrap_err();
    assert!(matches!(err, Error::Misuse(_)));
    assert_eq!((tx.nonce(), out.as_slice()), (5, b"kept".as_slice()));
    tx.seal_frame(&vec![0u8; MAX_PLAINTEXT], &mut out).unwrap();
    assert_eq!(out.len(), 4 + LENGTH_BYTES + MAX_FRAME_BODY);
}

#[test]
fn a_key_of_the_wrong_size_is_misuse() {
    assert!(matches!(
        CipherState::new(&[0u8; 31], 0),
        Err(Error::Misuse(_))
    ));
}
