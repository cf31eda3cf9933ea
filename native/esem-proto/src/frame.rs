//! Length-prefixed framing (PROTOCOL.md 2): `u32 BE length | body`, with
//! `1 <= length <= MAX_FRAME_BODY`. A length outside that range is refused as soon as
//! its four bytes have arrived, so a peer can never make us buffer more than one
//! maximal frame plus the next prefix.

use crate::consts::{LENGTH_BYTES, MAX_FRAME_BODY};
use crate::error::{Error, Result};

/// `body` as one frame. A body of 0 or more than `MAX_FRAME_BODY` bytes is misuse.
pub fn encode_frame(body: &[u8]) -> Result<Vec<u8>> {
    if body.is_empty() || body.len() > MAX_FRAME_BODY {
        return Err(Error::misuse(format!(
            "frame body of {} bytes outside 1..{MAX_FRAME_BODY}",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(LENGTH_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// Accumulates stream bytes and yields whole frame bodies, however the stream is split.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `data`; return every frame body now complete, in order. An out-of-range
    /// length is a `Protocol` error (the caller must close the session).
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.buf.extend_from_slice(data);
        let mut frames = Vec::new();
        let mut pos = 0;
        while self.buf.len() - pos >= LENGTH_BYTES {
            let mut len = [0u8; LENGTH_BYTES];
            len.copy_from_slice(&self.buf[pos..pos + LENGTH_BYTES]);
            let n = u32::from_be_bytes(len) as usize;
            if n == 0 || n > MAX_FRAME_BODY {
                self.buf.clear();
                return Err(Error::protocol(format!(
                    "frame length {n} outside 1..{MAX_FRAME_BODY}"
                )));
            }
            let end = pos + LENGTH_BYTES + n;
            if self.buf.len() < end {
                break;
            }
            frames.push(self.buf[pos + LENGTH_BYTES..end].to_vec());
            pos = end;
        }
        self.buf.drain(..pos);
        Ok(frames)
    }

    /// Bytes held for an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}
