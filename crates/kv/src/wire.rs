//! Our KV wire format, version 4. Every integer is little-endian.
//!
//! ```text
//! frame   := magic "SSKV" (4) | version u16 | kind u8 | flags u8 | payload_len u32 | payload
//! Hello   (1): JSON {nonce}, first frame each way; JSON {fingerprint} after both Auths
//! Auth    (8): 32-byte HMAC proving the pair's secret    — second frame each way
//! Pull    (2): id_len u16 | request_id | cap_len u16 | capability | from_block u32
//!              — the consumer has the blocks before `from_block` already (its prefix cache)
//! Layer   (3): layer u32 | n u32 | n × (block K bytes then V bytes)  — one per layer, in order
//! Done    (4): empty                                   — consumer confirms; producer frees
//! Error   (5): UTF-8 message
//! Meta    (6): JSON of what travels besides KV (token count, generated tokens, sampler state)
//! Release (7): id_len u16 | request_id | cap_len u16 | capability — consumer gave up
//! ```
//!
//! Decoding checks every length against what is there and a maximum payload size, so bad
//! bytes give a [`WireError`], never a panic or an unbounded allocation. Readers of a
//! stream check the announced length against what they expect (a control frame's
//! [`MAX_CONTROL_PAYLOAD`], a layer's size from the layout) before allocating anything.

pub const MAGIC: &[u8; 4] = b"SSKV";
pub const VERSION: u16 = 4;
pub const HEADER: usize = 12;
/// Largest payload accepted (a layer of a long prompt of a small model fits many times).
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Largest payload of any frame but `Layer`.
pub const MAX_CONTROL_PAYLOAD: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Vec<u8>),
    Auth(Vec<u8>),
    Pull {
        request_id: String,
        capability: String,
        /// Blocks (in position order) the consumer does not need sent.
        from_block: u32,
    },
    Layer {
        layer: u32,
        blocks: u32,
        data: Vec<u8>,
    },
    Done,
    Error(String),
    Meta(Vec<u8>),
    Release {
        request_id: String,
        capability: String,
    },
    /// As `Pull`, but the consumer reads the blocks itself over NIXL: the producer answers
    /// with `Meta` (where the blocks lie), then waits for the consumer's `Done`.
    NixlPull {
        request_id: String,
        capability: String,
        from_block: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?} (expected \"SSKV\")")]
    BadMagic([u8; 4]),
    #[error("unsupported wire version {0} (we speak {VERSION})")]
    Version(u16),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

/// Header of a frame of `kind` with a `len`-byte payload.
fn header(kind: u8, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_le_bytes());
    h[6] = kind;
    h[8..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// A u16-length-prefixed string (cut at 65,535 bytes, on a character boundary).
fn put_str(p: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    p.extend_from_slice(&(n as u16).to_le_bytes());
    p.extend_from_slice(&s.as_bytes()[..n]);
}

/// Reads a string written by [`put_str`] at `at`; returns it and where it ends.
fn get_str(
    p: &[u8],
    at: usize,
    kind: &'static str,
    what: &str,
) -> Result<(String, usize), WireError> {
    let bad = |reason: String| WireError::Malformed { kind, reason };
    let n = p
        .get(at..at + 2)
        .map(|x| u16::from_le_bytes([x[0], x[1]]) as usize)
        .ok_or_else(|| bad(format!("no {what} length")))?;
    let b = p
        .get(at + 2..at + 2 + n)
        .ok_or_else(|| bad(format!("{what} shorter than its length")))?;
    let s = String::from_utf8(b.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))?;
    Ok((s, at + 2 + n))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// The `kind` byte of each frame.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const PULL: u8 = 2;
    pub const LAYER: u8 = 3;
    pub const DONE: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const META: u8 = 6;
    pub const RELEASE: u8 = 7;
    pub const AUTH: u8 = 8;
    pub const NIXL_PULL: u8 = 9;
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Pull { .. } => kind::PULL,
            Frame::Layer { .. } => kind::LAYER,
            Frame::Done => kind::DONE,
            Frame::Error(_) => kind::ERROR,
            Frame::Meta(_) => kind::META,
            Frame::Release { .. } => kind::RELEASE,
            Frame::Auth(_) => kind::AUTH,
            Frame::NixlPull { .. } => kind::NIXL_PULL,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Frame::Hello(j) | Frame::Meta(j) | Frame::Auth(j) => p.extend_from_slice(j),
            Frame::Pull {
                request_id,
                capability,
                from_block,
            }
            | Frame::NixlPull {
                request_id,
                capability,
                from_block,
            } => {
                put_str(&mut p, request_id);
                put_str(&mut p, capability);
                p.extend_from_slice(&from_block.to_le_bytes());
            }
            Frame::Layer {
                layer,
                blocks,
                data,
            } => {
                p.extend_from_slice(&layer.to_le_bytes());
                p.extend_from_slice(&blocks.to_le_bytes());
                p.extend_from_slice(data);
            }
            Frame::Done => {}
            Frame::Error(m) => p.extend_from_slice(m.as_bytes()),
            Frame::Release {
                request_id,
                capability,
            } => {
                put_str(&mut p, request_id);
                put_str(&mut p, capability);
            }
        }
        let mut out = Vec::with_capacity(HEADER + p.len());
        out.extend_from_slice(&header(self.kind(), p.len()));
        out.extend_from_slice(&p);
        out
    }

    /// The bytes of a `Layer` frame before its data, so that a sender can write the data
    /// straight from where it lies (no staging copy of a whole layer).
    pub fn layer_prefix(layer: u32, blocks: u32, data_len: usize) -> [u8; HEADER + 8] {
        let mut out = [0u8; HEADER + 8];
        out[..HEADER].copy_from_slice(&header(3, data_len + 8));
        out[HEADER..HEADER + 4].copy_from_slice(&layer.to_le_bytes());
        out[HEADER + 4..].copy_from_slice(&blocks.to_le_bytes());
        out
    }

    /// The frame kind a valid header announces.
    pub fn header_kind(header: &[u8; HEADER]) -> u8 {
        header[6]
    }

    /// Payload length announced by a complete header (to size the next read).
    pub fn payload_len(header: &[u8; HEADER]) -> Result<usize, WireError> {
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&header[..4]);
        if &magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let v = u16::from_le_bytes([header[4], header[5]]);
        if v != VERSION {
            return Err(WireError::Version(v));
        }
        let len = u32_at(header, 8).unwrap_or(0) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        Ok(len)
    }

    /// Decodes one frame from the front of `buf`: `Ok(None)` if more bytes are needed,
    /// else the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        let Some(h) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let mut header = [0u8; HEADER];
        header.copy_from_slice(h);
        let len = Self::payload_len(&header)?;
        let Some(p) = buf.get(HEADER..HEADER + len) else {
            return Ok(None);
        };
        let bad = |kind, reason: &str| WireError::Malformed {
            kind,
            reason: reason.into(),
        };
        let frame = match header[6] {
            kind::HELLO => Frame::Hello(p.to_vec()),
            k @ (kind::PULL | kind::NIXL_PULL) => {
                let (request_id, at) = get_str(p, 0, "Pull", "id")?;
                let (capability, at) = get_str(p, at, "Pull", "capability")?;
                let from_block = u32_at(p, at).ok_or_else(|| bad("Pull", "no first block"))?;
                if p.len() != at + 4 {
                    return Err(bad(
                        "Pull",
                        &format!("{} bytes after the first block", p.len() - at - 4),
                    ));
                }
                if k == kind::PULL {
                    Frame::Pull {
                        request_id,
                        capability,
                        from_block,
                    }
                } else {
                    Frame::NixlPull {
                        request_id,
                        capability,
                        from_block,
                    }
                }
            }
            kind::LAYER => {
                let layer = u32_at(p, 0).ok_or_else(|| bad("Layer", "no layer index"))?;
                let blocks = u32_at(p, 4).ok_or_else(|| bad("Layer", "no block count"))?;
                Frame::Layer {
                    layer,
                    blocks,
                    data: p[8..].to_vec(),
                }
            }
            kind::DONE if p.is_empty() => Frame::Done,
            kind::DONE => return Err(bad("Done", "non-empty payload")),
            kind::ERROR => Frame::Error(String::from_utf8_lossy(p).into_owned()),
            kind::META => Frame::Meta(p.to_vec()),
            kind::RELEASE => {
                let (request_id, at) = get_str(p, 0, "Release", "id")?;
                let (capability, at) = get_str(p, at, "Release", "capability")?;
                if at != p.len() {
                    return Err(bad("Release", "bytes after the capability"));
                }
                Frame::Release {
                    request_id,
                    capability,
                }
            }
            kind::AUTH => Frame::Auth(p.to_vec()),
            k => return Err(WireError::Kind(k)),
        };
        Ok(Some((frame, HEADER + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Hello(br#"{"block_size":16}"#.to_vec()),
            Frame::Pull {
                request_id: "cmpl-1".into(),
                capability: "ab".repeat(16),
                from_block: 5,
            },
            Frame::Auth(vec![7; 32]),
            Frame::NixlPull {
                request_id: "cmpl-2".into(),
                capability: "cd".repeat(16),
                from_block: 0,
            },
            Frame::Layer {
                layer: 29,
                blocks: 2,
                data: (0..=255).collect(),
            },
            Frame::Done,
            Frame::Error("refused".into()),
            Frame::Meta(b"{}".to_vec()),
            Frame::Release {
                request_id: "cmpl-9-0".into(),
                capability: "cd".repeat(16),
            },
        ]
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        for f in frames() {
            let b = f.encode();
            assert_eq!(Frame::decode(&b), Ok(Some((f.clone(), b.len()))));
            // Every strict prefix asks for more bytes.
            for cut in 0..b.len() {
                assert_eq!(Frame::decode(&b[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
        }
        assert_eq!(
            Frame::Done.encode(),
            b"SSKV\x04\x00\x04\x00\x00\x00\x00\x00".to_vec()
        );
        let pull = Frame::Pull {
            request_id: "a".into(),
            capability: "c".into(),
            from_block: 7,
        }
        .encode();
        assert_eq!(&pull[12..], &[1, 0, b'a', 1, 0, b'c', 7, 0, 0, 0]);
        // A layer written as prefix + data is the same bytes as the encoded frame.
        let data = vec![9u8, 8, 7, 6, 5];
        let mut split = Frame::layer_prefix(4, 1, data.len()).to_vec();
        split.extend_from_slice(&data);
        let whole = Frame::Layer {
            layer: 4,
            blocks: 1,
            data,
        }
        .encode();
        assert_eq!(split, whole);
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        let mut b = Frame::Done.encode();
        b[0] = b'X';
        assert!(matches!(Frame::decode(&b), Err(WireError::BadMagic(_))));
        let mut b = Frame::Done.encode();
        b[4] = 9;
        assert_eq!(Frame::decode(&b), Err(WireError::Version(9)));
        let mut b = Frame::Done.encode();
        b[6] = 77;
        assert_eq!(Frame::decode(&b), Err(WireError::Kind(77)));
        let mut b = Frame::Done.encode();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Frame::decode(&b), Err(WireError::TooLarge(_))));
        // A Pull with bytes after its first block, its length saying so.
        let mut b = Frame::Pull {
            request_id: "x".into(),
            capability: "y".into(),
            from_block: 1,
        }
        .encode();
        b.push(0);
        b[8] += 1;
        assert!(matches!(
            Frame::decode(&b),
            Err(WireError::Malformed { kind: "Pull", .. })
        ));
        // Pseudo-random garbage of every length: never a panic.
        let mut s = 12345u64;
        for len in 0..600 {
            let mut g: Vec<u8> = (0..len)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (s >> 56) as u8
                })
                .collect();
            if len >= 12 && len % 3 == 0 {
                g[..4].copy_from_slice(MAGIC);
                g[4..6].copy_from_slice(&VERSION.to_le_bytes());
                g[6] = (len % 9) as u8;
                g[8..12].copy_from_slice(&((len - 12) as u32).to_le_bytes());
            }
            let _ = Frame::decode(&g);
        }
    }
}
