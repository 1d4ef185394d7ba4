//! TCP transport: the consumer pulls a held request's KV from the producer's side channel.
//!
//! Exchange: both sides send `Hello` (fingerprint JSON) and check the other's. The consumer
//! then sends `Release` (answered by `Done`: the held blocks are freed unread) or `Pull`,
//! answered by `Meta`, one `Layer` frame per layer, then `Done` (or `Error` at any point).
//! The producer writes the layers from its held blocks and frees them once sent; the
//! consumer reads them straight into the blocks its engine lent for the request. Neither
//! side stages the whole prompt's KV.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use splitserve_engine::{Engine, KvLayout, LoadTarget, Sampler};

use crate::fingerprint::{Fingerprint, HandshakeError};
use crate::wire::{Frame, WireError, HEADER};

/// Called by the producer after each served pull with the KV bytes sent.
pub type SentHook = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("KV side channel {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("KV wire: {0}")]
    Wire(#[from] WireError),
    #[error("peer refused: {0}")]
    Peer(String),
    #[error("unexpected frame from peer: {0}")]
    Protocol(String),
}

#[derive(Serialize, Deserialize)]
struct Meta {
    layout: KvLayout,
    n_tokens: usize,
    generated: Vec<u32>,
    sampler: Sampler,
}

fn io(addr: &str) -> impl Fn(std::io::Error) -> KvError + '_ {
    move |source| KvError::Io {
        addr: addr.to_string(),
        source,
    }
}

fn read_frame(s: &mut impl Read, addr: &str) -> Result<Frame, KvError> {
    let mut header = [0u8; HEADER];
    s.read_exact(&mut header).map_err(io(addr))?;
    let len = Frame::payload_len(&header)?;
    let mut buf = header.to_vec();
    buf.resize(HEADER + len, 0);
    s.read_exact(&mut buf[HEADER..]).map_err(io(addr))?;
    match Frame::decode(&buf)? {
        Some((f, _)) => Ok(f),
        None => Err(KvError::Protocol("short frame".into())),
    }
}

fn write_frame(s: &mut TcpStream, addr: &str, f: &Frame) -> Result<(), KvError> {
    s.write_all(&f.encode()).map_err(io(addr))
}

fn hello(s: &mut TcpStream, addr: &str, ours: &Fingerprint) -> Result<(), KvError> {
    let json = serde_json::to_vec(ours).map_err(|e| KvError::Protocol(e.to_string()))?;
    write_frame(s, addr, &Frame::Hello(json))?;
    match read_frame(s, addr)? {
        Frame::Hello(j) => {
            let theirs: Fingerprint = serde_json::from_slice(&j)
                .map_err(|e| KvError::Protocol(format!("bad fingerprint: {e}")))?;
            if let Err(e) = ours.check(&theirs) {
                let _ = write_frame(s, addr, &Frame::Error(e.to_string()));
                return Err(e.into());
            }
            Ok(())
        }
        Frame::Error(m) => Err(KvError::Peer(m)),
        other => Err(KvError::Protocol(format!("{other:?}"))),
    }
}

/// Producer side: serves pulls of held requests until the listener fails.
pub fn serve(
    listener: TcpListener,
    engine: Engine,
    fingerprint: Fingerprint,
    on_sent: Option<SentHook>,
) {
    for conn in listener.incoming() {
        let mut s = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin on the error.
                tracing::warn!(error = %e, "cannot accept a KV pull");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let (engine, fp, hook) = (engine.clone(), fingerprint.clone(), on_sent.clone());
        let addr = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let peer = addr.clone();
        let started = std::thread::Builder::new()
            .name("kv-serve".into())
            .spawn(move || match serve_one(&mut s, &addr, &engine, &fp) {
                Ok(bytes) => {
                    if let Some(h) = hook {
                        h(bytes);
                    }
                }
                Err(e) => tracing::warn!(peer = %addr, error = %e, "KV pull failed"),
            });
        // Out of threads: this pull's connection closes (the consumer sees the error) and
        // the listener goes on.
        if let Err(e) = started {
            tracing::error!(%peer, error = %e, "cannot start a thread for a KV pull");
        }
    }
}

fn serve_one(
    s: &mut TcpStream,
    addr: &str,
    engine: &Engine,
    fp: &Fingerprint,
) -> Result<u64, KvError> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    // A peer that stops reading must not keep lent blocks forever.
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_nodelay(true);
    hello(s, addr, fp)?;
    let id = match read_frame(s, addr)? {
        Frame::Pull { request_id, .. } => request_id,
        Frame::Release(id) => {
            tracing::info!(id = %id, "consumer released held KV");
            engine.abort(&id);
            write_frame(s, addr, &Frame::Done)?;
            return Ok(0);
        }
        other => return Err(KvError::Protocol(format!("{other:?}"))),
    };
    // The held blocks are lent to us; they are written to the socket as they lie in the
    // cache (no staging copy) and freed when `held` is dropped.
    let held = match engine.lease_held(&id) {
        Ok(h) => h,
        Err(e) => {
            write_frame(s, addr, &Frame::Error(e.to_string()))?;
            return Err(KvError::Peer(e.to_string()));
        }
    };
    let layout = held.layout();
    let blocks = held.n_blocks();
    let meta = Meta {
        layout,
        n_tokens: held.n_tokens,
        generated: held.generated.clone(),
        sampler: held.sampler.clone(),
    };
    let json = serde_json::to_vec(&meta).map_err(|e| KvError::Protocol(e.to_string()))?;
    write_frame(s, addr, &Frame::Meta(json))?;
    let per_block = layout.layer_block_bytes();
    let mut bytes = 0u64;
    // One buffered writer: many small block writes become few syscalls.
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *s);
    for layer in 0..layout.n_layer {
        w.write_all(&Frame::layer_prefix(
            layer as u32,
            blocks as u32,
            blocks * per_block,
        ))
        .map_err(io(addr))?;
        for i in 0..blocks {
            for part in held.block(layer, i) {
                w.write_all(part).map_err(io(addr))?;
            }
        }
        bytes += (blocks * per_block) as u64;
    }
    w.flush().map_err(io(addr))?;
    drop(w);
    drop(held);
    write_frame(s, addr, &Frame::Done)?;
    Ok(bytes)
}

fn connect(addr: &str, fingerprint: &Fingerprint) -> Result<TcpStream, KvError> {
    let sock = addr
        .to_socket_addrs()
        .map_err(io(addr))?
        .next()
        .ok_or_else(|| KvError::Protocol(format!("{addr} resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(io(addr))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    // A peer that stops reading must not keep lent blocks forever.
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_nodelay(true);
    hello(&mut s, addr, fingerprint)?;
    Ok(s)
}

/// Consumer side: tells the producer at `addr` that request `id`'s KV will not be pulled.
pub fn release(addr: &str, fingerprint: &Fingerprint, id: &str) -> Result<(), KvError> {
    let mut s = connect(addr, fingerprint)?;
    write_frame(&mut s, addr, &Frame::Release(id.to_string()))?;
    match read_frame(&mut s, addr)? {
        Frame::Done => Ok(()),
        Frame::Error(m) => Err(KvError::Peer(m)),
        other => Err(KvError::Protocol(format!("{other:?}"))),
    }
}

/// What the consumer read besides the KV: the producer's first tokens and sampler.
pub struct Loaded {
    pub n_tokens: usize,
    pub generated: Vec<u32>,
    pub sampler: Sampler,
    pub bytes: u64,
}

/// Consumer side: pulls request `id`'s KV from the producer at `addr` straight into the
/// blocks of `target`, layer by layer as the frames arrive.
pub fn load_into(
    addr: &str,
    fingerprint: &Fingerprint,
    id: &str,
    target: &mut LoadTarget,
) -> Result<Loaded, KvError> {
    let mut s = connect(addr, fingerprint)?;
    write_frame(
        &mut s,
        addr,
        &Frame::Pull {
            request_id: id.to_string(),
            blocks: vec![],
        },
    )?;
    let meta: Meta = match read_frame(&mut s, addr)? {
        Frame::Meta(j) => {
            serde_json::from_slice(&j).map_err(|e| KvError::Protocol(format!("bad meta: {e}")))?
        }
        Frame::Error(m) => return Err(KvError::Peer(m)),
        other => return Err(KvError::Protocol(format!("{other:?}"))),
    };
    let layout = target.layout();
    if meta.layout != layout {
        return Err(KvError::Protocol(format!(
            "producer's KV layout {:?} differs from ours {layout:?}",
            meta.layout
        )));
    }
    if meta.n_tokens != target.n_tokens() {
        return Err(KvError::Protocol(format!(
            "the producer holds KV for {} tokens; this request's prompt has {}",
            meta.n_tokens,
            target.n_tokens()
        )));
    }
    let blocks = target.n_blocks();
    let per_block = layout.layer_block_bytes();
    let mut r = std::io::BufReader::with_capacity(1 << 20, &mut s);
    let mut bytes = 0u64;
    for layer in 0..layout.n_layer {
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).map_err(io(addr))?;
        let len = Frame::payload_len(&header)?;
        if Frame::header_kind(&header) != 3 {
            let mut buf = header.to_vec();
            buf.resize(HEADER + len, 0);
            r.read_exact(&mut buf[HEADER..]).map_err(io(addr))?;
            return match Frame::decode(&buf)? {
                Some((Frame::Error(m), _)) => Err(KvError::Peer(m)),
                other => Err(KvError::Protocol(format!(
                    "{other:?} where layer {layer} was due"
                ))),
            };
        }
        if len < 8 {
            return Err(KvError::Protocol(format!("layer frame of {len} bytes")));
        }
        let mut pre = [0u8; 8];
        r.read_exact(&mut pre).map_err(io(addr))?;
        let got_layer = u32::from_le_bytes([pre[0], pre[1], pre[2], pre[3]]) as usize;
        let got_blocks = u32::from_le_bytes([pre[4], pre[5], pre[6], pre[7]]) as usize;
        if got_layer != layer || got_blocks != blocks || len != 8 + blocks * per_block {
            return Err(KvError::Protocol(format!(
                "layer frame {got_layer} with {got_blocks} blocks ({len} bytes) where layer {layer} with {blocks} blocks was due"
            )));
        }
        // Straight from the socket into the request's blocks.
        for i in 0..blocks {
            for part in target.block_mut(layer, i) {
                r.read_exact(part).map_err(io(addr))?;
            }
        }
        bytes += (blocks * per_block) as u64;
    }
    match read_frame(&mut r, addr)? {
        Frame::Done => {}
        Frame::Error(m) => return Err(KvError::Peer(m)),
        other => return Err(KvError::Protocol(format!("{other:?} after the last layer"))),
    }
    Ok(Loaded {
        n_tokens: meta.n_tokens,
        generated: meta.generated,
        sampler: meta.sampler,
        bytes,
    })
}
