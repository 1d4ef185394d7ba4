//! TCP transport: the consumer pulls a held request's KV from the producer's side channel.
//!
//! Exchange: both sides send `Hello` (fingerprint JSON) and check the other's; the consumer
//! sends `Pull`; the producer answers `Meta`, then one `Layer` frame per layer, then `Done`
//! (or `Error` at any point). The producer's blocks are freed when it has read them out.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use splitserve_engine::{Engine, KvImport, KvLayout, Sampler};

use crate::fingerprint::{Fingerprint, HandshakeError};
use crate::wire::{Frame, WireError};

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

fn read_frame(s: &mut TcpStream, addr: &str) -> Result<Frame, KvError> {
    let mut header = [0u8; 12];
    s.read_exact(&mut header).map_err(io(addr))?;
    let len = Frame::payload_len(&header)?;
    let mut buf = header.to_vec();
    buf.resize(12 + len, 0);
    s.read_exact(&mut buf[12..]).map_err(io(addr))?;
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
pub fn serve(listener: TcpListener, engine: Engine, fingerprint: Fingerprint) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let (engine, fp) = (engine.clone(), fingerprint.clone());
        std::thread::spawn(move || {
            let addr = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = serve_one(&mut s, &addr, &engine, &fp) {
                tracing::warn!(peer = %addr, error = %e, "KV pull failed");
            }
        });
    }
}

fn serve_one(
    s: &mut TcpStream,
    addr: &str,
    engine: &Engine,
    fp: &Fingerprint,
) -> Result<(), KvError> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    hello(s, addr, fp)?;
    let id = match read_frame(s, addr)? {
        Frame::Pull { request_id, .. } => request_id,
        other => return Err(KvError::Protocol(format!("{other:?}"))),
    };
    let kv = match engine.export_held(&id) {
        Ok(kv) => kv,
        Err(e) => {
            write_frame(s, addr, &Frame::Error(e.to_string()))?;
            return Err(KvError::Peer(e.to_string()));
        }
    };
    let blocks = kv.n_tokens.div_ceil(kv.layout.block_size) as u32;
    let meta = Meta {
        layout: kv.layout,
        n_tokens: kv.n_tokens,
        generated: kv.generated,
        sampler: kv.sampler,
    };
    let json = serde_json::to_vec(&meta).map_err(|e| KvError::Protocol(e.to_string()))?;
    write_frame(s, addr, &Frame::Meta(json))?;
    for (layer, data) in kv.layers.into_iter().enumerate() {
        write_frame(
            s,
            addr,
            &Frame::Layer {
                layer: layer as u32,
                blocks,
                data,
            },
        )?;
    }
    write_frame(s, addr, &Frame::Done)
}

/// Consumer side: pulls request `id`'s KV from the producer at `addr`.
pub fn pull(addr: &str, fingerprint: &Fingerprint, id: &str) -> Result<KvImport, KvError> {
    let sock = addr
        .to_socket_addrs()
        .map_err(io(addr))?
        .next()
        .ok_or_else(|| KvError::Protocol(format!("{addr} resolves to nothing")))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(io(addr))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_nodelay(true);
    hello(&mut s, addr, fingerprint)?;
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
    let mut layers = Vec::with_capacity(meta.layout.n_layer);
    loop {
        match read_frame(&mut s, addr)? {
            Frame::Layer { layer, data, .. } if layer as usize == layers.len() => layers.push(data),
            Frame::Done if layers.len() == meta.layout.n_layer => break,
            Frame::Error(m) => return Err(KvError::Peer(m)),
            other => {
                return Err(KvError::Protocol(format!(
                    "{other:?} after {} layers",
                    layers.len()
                )))
            }
        }
    }
    Ok(KvImport {
        layout: meta.layout,
        n_tokens: meta.n_tokens,
        layers,
        generated: meta.generated,
        sampler: meta.sampler,
    })
}
