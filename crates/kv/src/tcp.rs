//! TCP transport: the consumer pulls a held request's KV from the producer's side channel.
//!
//! Exchange: both sides send `Hello` (a fresh random nonce), then `Auth`: an HMAC under the
//! pair's secret over the sender's role and both nonces, the consumer's first; the producer
//! sends its own only after checking the consumer's. Each side checks the other's proof
//! before anything else (mutual challenge-response: neither a client without the secret nor
//! a replayed proof gets further); only then do both send a second `Hello` with their
//! fingerprint, so a stranger learns nothing of the model, and compare fingerprints. The
//! consumer then sends `Release` (answered by `Done`: the held blocks are freed unread) or
//! `Pull`, answered by `Meta`, one `Layer` frame per layer, then `Done` (or `Error` at any
//! point). Both carry the capability of a grant ([`crate::grant`]), which is served once.
//! The producer writes the layers from its held blocks and frees them once sent; the
//! consumer reads them straight into the blocks its engine lent for the request. Neither
//! side stages the whole prompt's KV.
//!
//! Bounds: a frame's announced size is checked before any allocation (control frames
//! [`MAX_CONTROL_PAYLOAD`], layers the size the layout implies), the side channel serves at
//! most [`MAX_CONNECTIONS`] connections at once, the handshake must finish within
//! [`HANDSHAKE_TIMEOUT`], and every later read or write within [`IO_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use splitserve_engine::{Engine, KvLayout, LoadTarget, Sampler};

use crate::auth::{hex, random_bytes, unhex, Secret};
use crate::fingerprint::{Fingerprint, HandshakeError};
use crate::grant::{Grants, RemoteAddr};
use crate::tls::{Link, Tls};
use crate::wire::{kind, Frame, WireError, HEADER, MAX_CONTROL_PAYLOAD};

/// Called by the producer after each served pull with the KV bytes sent.
pub type SentHook = std::sync::Arc<dyn Fn(u64) + Send + Sync>;

/// Side-channel connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Time for a peer to finish the handshake (hello, proof, fingerprint).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for any one read or write after it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a consumer gives a NIXL read: less than the producer waits for its end (IO_TIMEOUT
/// from its answer), so the producer never frees blocks under a read that may yet succeed.
#[cfg(feature = "nixl")]
const NIXL_READ_TIMEOUT: Duration = Duration::from_secs(20);
const AUTH_LABEL: &[u8] = b"splitserve-kv-auth-v2";

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("KV side channel {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("KV side channel: the peer does not hold this pair's secret (authentication failed)")]
    Auth,
    #[error("KV wire: {0}")]
    Wire(#[from] WireError),
    #[error("peer refused: {0}")]
    Peer(String),
    #[error("unexpected frame from peer: {0}")]
    Protocol(String),
    /// The NIXL read (NixlConnector) failed.
    #[error("{0}")]
    Transport(String),
    /// The NIXL read did not end in time and may still write into the lent blocks.
    #[error("{0}")]
    InFlight(String),
}

#[derive(Serialize, Deserialize)]
struct Meta {
    layout: KvLayout,
    n_tokens: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    /// Answering a `NixlPull`: where the blocks lie for the consumer to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nixl: Option<NixlWhere>,
}

/// Where a held request's blocks lie in the producer's pool, for a NIXL read: the
/// producer's agent (name, metadata in hex), its pool regions (each layer's K then V, as
/// address and bytes) and, per layer, where the blocks sent in that layer lie in its
/// regions (in blocks), in position order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NixlWhere {
    pub agent: String,
    pub md: String,
    pub regions: Vec<(u64, u64)>,
    pub blocks: Vec<Vec<u32>>,
}

/// The first `Hello` carries the nonce, the second (after both proofs) the fingerprint.
#[derive(Serialize, Deserialize)]
struct Hello {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<Fingerprint>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    nonce: String,
}

fn io(addr: &str) -> impl Fn(std::io::Error) -> KvError + '_ {
    move |source| KvError::Io {
        addr: addr.to_string(),
        source,
    }
}

/// Reads one control frame; a payload over `MAX_CONTROL_PAYLOAD` is refused unread.
pub(crate) fn read_frame(s: &mut impl Read, addr: &str) -> Result<Frame, KvError> {
    let mut header = [0u8; HEADER];
    s.read_exact(&mut header).map_err(io(addr))?;
    let len = Frame::payload_len(&header)?;
    if len > MAX_CONTROL_PAYLOAD {
        return Err(KvError::Protocol(format!(
            "a frame of kind {} announces {len} bytes; control frames have at most {MAX_CONTROL_PAYLOAD}",
            Frame::header_kind(&header)
        )));
    }
    let mut buf = header.to_vec();
    buf.resize(HEADER + len, 0);
    s.read_exact(&mut buf[HEADER..]).map_err(io(addr))?;
    match Frame::decode(&buf)? {
        Some((f, _)) => Ok(f),
        None => Err(KvError::Protocol("short frame".into())),
    }
}

fn write_frame(s: &mut impl Write, addr: &str, f: &Frame) -> Result<(), KvError> {
    s.write_all(&f.encode()).map_err(io(addr))
}

/// A byte stream the handshake runs over (a socket; in the fuzz targets, bytes in memory).
pub(crate) trait Conn: Read + Write {
    fn set_read_wait(&mut self, d: Duration);
}

impl Conn for TcpStream {
    fn set_read_wait(&mut self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Role {
    Producer,
    Consumer,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Producer => b"producer",
            Role::Consumer => b"consumer",
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Producer => Role::Consumer,
            Role::Consumer => Role::Producer,
        }
    }
}

/// A connection whose reads must all end by one instant: a per-read timeout alone lets a
/// peer that sends a byte every few seconds keep a connection (and its slot) for hours.
struct Deadline<'a, C: Conn> {
    inner: &'a mut C,
    by: Instant,
}

impl<C: Conn> Read for Deadline<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer did not answer in time".to_string(),
            ));
        }
        self.inner.set_read_wait(left);
        self.inner.read(buf)
    }
}

impl<C: Conn> Write for Deadline<'_, C> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Hello and proof each way, all within [`HANDSHAKE_TIMEOUT`]; then the fingerprints must
/// match.
pub(crate) fn handshake(
    s: &mut impl Conn,
    addr: &str,
    ours: &Fingerprint,
    secret: &Secret,
    role: Role,
) -> Result<(), KvError> {
    let by = Instant::now() + HANDSHAKE_TIMEOUT;
    handshake_by(&mut Deadline { inner: s, by }, addr, ours, secret, role)?;
    s.set_read_wait(IO_TIMEOUT);
    Ok(())
}

fn handshake_by(
    s: &mut (impl Read + Write),
    addr: &str,
    ours: &Fingerprint,
    secret: &Secret,
    role: Role,
) -> Result<(), KvError> {
    let nonce = random_bytes(16).map_err(|e| KvError::Protocol(e.to_string()))?;
    let theirs = exchange_hello(
        s,
        addr,
        &Hello {
            fingerprint: None,
            nonce: hex(&nonce),
        },
    )?;
    let their_nonce = unhex(&theirs.nonce)
        .filter(|n| n.len() == 16)
        .ok_or_else(|| KvError::Protocol("hello without a 16-byte nonce".into()))?;
    // The consumer proves first; the producer answers only a peer that has proven, so it
    // hands a stranger nothing computed with the secret.
    let proof = Frame::Auth(
        secret
            .mac(&[AUTH_LABEL, role.label(), &nonce, &their_nonce])
            .to_vec(),
    );
    if matches!(role, Role::Consumer) {
        write_frame(s, addr, &proof)?;
    }
    match read_frame(s, addr)? {
        Frame::Auth(tag) => {
            let want = [AUTH_LABEL, role.peer().label(), &their_nonce, &nonce];
            if !secret.verify(&want, &tag) {
                let _ = write_frame(s, addr, &Frame::Error(KvError::Auth.to_string()));
                return Err(KvError::Auth);
            }
        }
        Frame::Error(m) => return Err(KvError::Peer(m)),
        other => {
            return Err(KvError::Protocol(format!(
                "{other:?} where a proof was due"
            )))
        }
    }
    if matches!(role, Role::Producer) {
        write_frame(s, addr, &proof)?;
    }
    // Both proven: now the fingerprints.
    let theirs = exchange_hello(
        s,
        addr,
        &Hello {
            fingerprint: Some(ours.clone()),
            nonce: String::new(),
        },
    )?
    .fingerprint
    .ok_or_else(|| KvError::Protocol("hello without a fingerprint after the proofs".into()))?;
    if let Err(e) = ours.check(&theirs) {
        let _ = write_frame(s, addr, &Frame::Error(e.to_string()));
        return Err(e.into());
    }
    Ok(())
}

/// Sends `ours` and reads the peer's `Hello`.
fn exchange_hello(s: &mut (impl Read + Write), addr: &str, ours: &Hello) -> Result<Hello, KvError> {
    let json = serde_json::to_vec(ours).map_err(|e| KvError::Protocol(e.to_string()))?;
    write_frame(s, addr, &Frame::Hello(json))?;
    match read_frame(s, addr)? {
        Frame::Hello(j) => {
            serde_json::from_slice(&j).map_err(|e| KvError::Protocol(format!("bad hello: {e}")))
        }
        Frame::Error(m) => Err(KvError::Peer(m)),
        other => Err(KvError::Protocol(format!("{other:?} where hello was due"))),
    }
}

/// The producer's side channel: serves pulls and releases of granted, held KV.
pub struct SideChannel {
    pub engine: Engine,
    pub fingerprint: Fingerprint,
    pub grants: Arc<Grants>,
    pub on_sent: Option<SentHook>,
    /// TLS the side channel serves in (`Tls::default()`: plain TCP).
    pub tls: Tls,
    /// NixlConnector: the agent consumers read the blocks through.
    #[cfg(feature = "nixl")]
    pub nixl: Option<Arc<crate::nixl::Nixl>>,
}

/// Decrements the open-connection count when a connection's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SideChannel {
    /// Serves connections until the listener fails.
    pub fn serve(self, listener: TcpListener) {
        let open = Arc::new(AtomicUsize::new(0));
        let this = Arc::new(self);
        for conn in listener.incoming() {
            let s = match conn {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, say: wait a little rather than spin on the error.
                    tracing::warn!(error = %e, "cannot accept a KV pull");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let addr = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let _ = s.set_nodelay(true);
            if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(peer = %addr, "KV side channel at {MAX_CONNECTIONS} connections; closing a new one");
                continue;
            }
            let slot = Slot(open.clone());
            let this = this.clone();
            let peer = addr.clone();
            let started = std::thread::Builder::new()
                .name("kv-serve".into())
                .spawn(move || {
                    let _slot = slot;
                    let mut s = match this.tls.accept(s) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(peer = %addr, error = %e, "KV side channel: TLS setup failed");
                            return;
                        }
                    };
                    match this.serve_one(&mut s, &addr) {
                        Ok(bytes) => {
                            if let Some(h) = &this.on_sent {
                                h(bytes);
                            }
                        }
                        Err(e) => {
                            // Tell an honest peer what was wrong with what it sent.
                            if matches!(e, KvError::Protocol(_) | KvError::Wire(_)) {
                                let _ = write_frame(&mut s, &addr, &Frame::Error(e.to_string()));
                            }
                            tracing::warn!(peer = %addr, error = %e, "KV side-channel connection failed")
                        }
                    }
                });
            // Out of threads: this connection closes (the consumer sees the error) and the
            // listener goes on.
            if let Err(e) = started {
                tracing::error!(%peer, error = %e, "cannot start a thread for a KV pull");
            }
        }
    }

    fn refuse(s: &mut Link, addr: &str, id: &str) -> KvError {
        let m = format!("no live grant of KV for request {id} with that capability");
        let _ = write_frame(s, addr, &Frame::Error(m.clone()));
        KvError::Peer(m)
    }

    fn serve_one(&self, s: &mut Link, addr: &str) -> Result<u64, KvError> {
        // A peer that stops reading must not keep lent blocks forever.
        s.set_write_wait(IO_TIMEOUT);
        handshake(
            s,
            addr,
            &self.fingerprint,
            self.grants.secret(),
            Role::Producer,
        )?;
        let engine = &self.engine;
        let (id, capability, from, release, nixl) = match read_frame(s, addr)? {
            Frame::Pull {
                request_id,
                capability,
                from_block,
            } => (request_id, capability, from_block as usize, false, false),
            Frame::NixlPull {
                request_id,
                capability,
                from_block,
            } => (request_id, capability, from_block as usize, false, true),
            Frame::Release {
                request_id,
                capability,
            } => (request_id, capability, 0, true, false),
            other => return Err(KvError::Protocol(format!("{other:?}"))),
        };
        if !self.grants.redeem(&id, &capability) {
            return Err(Self::refuse(s, addr, &id));
        }
        if release {
            tracing::info!(id = %id, "consumer released held KV");
            engine.release_held(&id);
            write_frame(s, addr, &Frame::Done)?;
            return Ok(0);
        }
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
        if from >= held.n_blocks() {
            // Every request loads at least its last block; more than it holds is a lie.
            let m = format!(
                "the pull starts at block {from}; request {id} holds {} blocks",
                held.n_blocks()
            );
            write_frame(s, addr, &Frame::Error(m.clone()))?;
            return Err(KvError::Peer(m));
        }
        // The consumer has the blocks before `from` in its prefix cache.
        let bytes = layout.kv_bytes(held.n_tokens, from, held.n_blocks()) as u64;
        let mut meta = Meta {
            layout,
            n_tokens: held.n_tokens,
            generated: held.generated.clone(),
            sampler: held.sampler.clone(),
            nixl: None,
        };
        if nixl {
            // The consumer reads the blocks itself; they stay lent until it says it is done.
            let at: Vec<Vec<u32>> = (0..layout.n_layer)
                .map(|l| held.layer_indices(l, from))
                .collect();
            meta.nixl = Some(self.nixl_where(s, addr, &at)?);
            let json = serde_json::to_vec(&meta).map_err(|e| KvError::Protocol(e.to_string()))?;
            if json.len() > MAX_CONTROL_PAYLOAD {
                let m = format!(
                    "request {id}'s blocks take {} bytes to locate, over the {MAX_CONTROL_PAYLOAD}-byte control frame; use TcpConnector for prompts this long",
                    json.len()
                );
                write_frame(s, addr, &Frame::Error(m.clone()))?;
                return Err(KvError::Peer(m));
            }
            #[cfg(feature = "nixl")]
            let serving = self.nixl.as_ref().map(|n| n.serving());
            write_frame(s, addr, &Frame::Meta(json))?;
            // The whole wait has one deadline: a peer that trickles bytes must not keep the
            // blocks lent. The consumer's read has less time than this (NIXL_READ_TIMEOUT).
            let done = read_frame(
                &mut Deadline {
                    inner: s,
                    by: Instant::now() + IO_TIMEOUT,
                },
                addr,
            );
            #[cfg(feature = "nixl")]
            drop(serving);
            match done? {
                Frame::Done => {}
                Frame::Error(m) => return Err(KvError::Peer(m)),
                other => return Err(KvError::Protocol(format!("{other:?} after a NIXL read"))),
            }
            drop(held);
            write_frame(s, addr, &Frame::Done)?;
            return Ok(bytes);
        }
        let json = serde_json::to_vec(&meta).map_err(|e| KvError::Protocol(e.to_string()))?;
        write_frame(s, addr, &Frame::Meta(json))?;
        let per_block = layout.layer_block_bytes();
        let mut bytes = 0u64;
        // One buffered writer: many small block writes become few syscalls.
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *s);
        for layer in 0..layout.n_layer {
            // A windowed layer sends only the blocks its window still reaches.
            let sent = held.layer_blocks(layer, from);
            w.write_all(&Frame::layer_prefix(
                layer as u32,
                sent.len() as u32,
                sent.len() * per_block,
            ))
            .map_err(io(addr))?;
            bytes += (sent.len() * per_block) as u64;
            for i in sent {
                for part in held.block(layer, i) {
                    w.write_all(part).map_err(io(addr))?;
                }
            }
        }
        w.flush().map_err(io(addr))?;
        drop(w);
        drop(held);
        write_frame(s, addr, &Frame::Done)?;
        Ok(bytes)
    }
}

impl SideChannel {
    /// Where `blocks` lie for a NIXL read, or the refusal the consumer is sent.
    fn nixl_where(
        &self,
        s: &mut Link,
        addr: &str,
        blocks: &[Vec<u32>],
    ) -> Result<NixlWhere, KvError> {
        #[cfg(feature = "nixl")]
        if let Some(n) = &self.nixl {
            return n
                .at(&self.engine.kv_regions(), blocks)
                .map_err(|e| KvError::Transport(e.to_string()));
        }
        let _ = blocks;
        let m = "this producer serves no NIXL reads (its kv_connector is not NixlConnector)";
        write_frame(s, addr, &Frame::Error(m.into()))?;
        Err(KvError::Peer(m.into()))
    }
}

fn connect(
    addr: &str,
    fingerprint: &Fingerprint,
    secret: &Secret,
    tls: &Tls,
) -> Result<Link, KvError> {
    let sock = addr
        .to_socket_addrs()
        .map_err(io(addr))?
        .next()
        .ok_or_else(|| KvError::Protocol(format!("{addr} resolves to nothing")))?;
    let s = TcpStream::connect_timeout(&sock, CONNECT_TIMEOUT).map_err(io(addr))?;
    let _ = s.set_nodelay(true);
    // The grant's host, without the port, is the name the producer's certificate must have.
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut s = tls
        .connect(s, host)
        .map_err(|e| KvError::Protocol(format!("TLS to {addr}: {e}")))?;
    // A peer that stops reading must not keep lent blocks forever.
    s.set_write_wait(IO_TIMEOUT);
    handshake(&mut s, addr, fingerprint, secret, Role::Consumer)?;
    Ok(s)
}

/// Consumer side: tells the producer that the granted KV of `r` will not be pulled.
pub fn release(
    r: &RemoteAddr,
    fingerprint: &Fingerprint,
    secret: &Secret,
    tls: &Tls,
) -> Result<(), KvError> {
    let addr = r.addr.as_str();
    let mut s = connect(addr, fingerprint, secret, tls)?;
    write_frame(
        &mut s,
        addr,
        &Frame::Release {
            request_id: r.request_id.clone(),
            capability: r.capability.clone(),
        },
    )?;
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

/// Consumer side: pulls the granted KV of `r` straight into the blocks of `target`, layer
/// by layer as the frames arrive.
pub fn load_into(
    r: &RemoteAddr,
    fingerprint: &Fingerprint,
    secret: &Secret,
    tls: &Tls,
    target: &mut LoadTarget,
) -> Result<Loaded, KvError> {
    let addr = r.addr.as_str();
    let (mut s, meta) = ask(r, fingerprint, secret, tls, target, false)?;
    let layout = target.layout();
    let per_block = layout.layer_block_bytes();
    let mut r = std::io::BufReader::with_capacity(1 << 20, &mut s);
    let mut bytes = 0u64;
    for layer in 0..layout.n_layer {
        let mut header = [0u8; HEADER];
        r.read_exact(&mut header).map_err(io(addr))?;
        let len = Frame::payload_len(&header)?;
        if Frame::header_kind(&header) != kind::LAYER {
            if len > MAX_CONTROL_PAYLOAD {
                return Err(KvError::Protocol(format!(
                    "a frame of {len} bytes where layer {layer} was due"
                )));
            }
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
        let want = target.layer_blocks(layer);
        let n = want.len();
        if got_layer != layer || got_blocks != n || len != 8 + n * per_block {
            return Err(KvError::Protocol(format!(
                "layer frame {got_layer} with {got_blocks} blocks ({len} bytes) where layer {layer} with {n} blocks was due"
            )));
        }
        // Straight from the socket into the request's blocks.
        for i in want {
            for part in target.block_mut(layer, i) {
                r.read_exact(part).map_err(io(addr))?;
            }
        }
        bytes += (n * per_block) as u64;
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

/// Connects, asks for the granted KV of `r` (`Pull`, or `NixlPull` to read it over NIXL)
/// and returns the connection and the producer's `Meta`, checked against `target`.
fn ask(
    r: &RemoteAddr,
    fingerprint: &Fingerprint,
    secret: &Secret,
    tls: &Tls,
    target: &LoadTarget,
    nixl: bool,
) -> Result<(Link, Meta), KvError> {
    let addr = r.addr.as_str();
    let mut s = connect(addr, fingerprint, secret, tls)?;
    let (request_id, capability) = (r.request_id.clone(), r.capability.clone());
    let from_block = target.first_block() as u32;
    let ask = if nixl {
        Frame::NixlPull {
            request_id,
            capability,
            from_block,
        }
    } else {
        Frame::Pull {
            request_id,
            capability,
            from_block,
        }
    };
    write_frame(&mut s, addr, &ask)?;
    let meta: Meta = match read_frame(&mut s, addr)? {
        Frame::Meta(j) => {
            serde_json::from_slice(&j).map_err(|e| KvError::Protocol(format!("bad meta: {e}")))?
        }
        Frame::Error(m) => return Err(KvError::Peer(m)),
        other => return Err(KvError::Protocol(format!("{other:?}"))),
    };
    check_meta(&meta, target)?;
    Ok((s, meta))
}

/// Checks the producer's `Meta` against the request's blocks.
fn check_meta(meta: &Meta, target: &LoadTarget) -> Result<(), KvError> {
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
    Ok(())
}

/// Consumer side, NixlConnector: asks where the granted KV of `r` lies and reads it over
/// NIXL straight into the blocks of `target`, then tells the producer it may free them.
#[cfg(feature = "nixl")]
pub fn load_over_nixl(
    r: &RemoteAddr,
    fingerprint: &Fingerprint,
    secret: &Secret,
    tls: &Tls,
    nixl: &crate::nixl::Nixl,
    target: &mut LoadTarget,
) -> Result<Loaded, KvError> {
    let transport = |e: crate::nixl::NixlError| KvError::Transport(e.to_string());
    let t0 = Instant::now();
    nixl.register(&target.pool_regions()).map_err(transport)?;
    let addr = r.addr.as_str();
    let (mut s, meta) = ask(r, fingerprint, secret, tls, target, true)?;
    let t_ask = Instant::now();
    let w = meta
        .nixl
        .as_ref()
        .ok_or_else(|| KvError::Protocol("no NIXL location in the producer's answer".into()))?;
    let layout = target.layout();
    let offered: Vec<usize> = w.blocks.iter().map(Vec::len).collect();
    let wanted: Vec<usize> = (0..layout.n_layer)
        .map(|l| target.layer_blocks(l).len())
        .collect();
    if offered != wanted {
        return Err(KvError::Protocol(format!(
            "the producer offers {offered:?} blocks per layer; this request loads {wanted:?}"
        )));
    }
    let part = layout.layer_block_bytes() / 2;
    let mut local = Vec::with_capacity(2 * wanted.iter().sum::<usize>());
    // Each layer's K parts, then its V parts: the order of the producer's regions.
    for layer in 0..layout.n_layer {
        for kv in 0..2 {
            for i in target.layer_blocks(layer) {
                let p = &mut target.block_mut(layer, i)[kv];
                if p.len() != part {
                    return Err(KvError::Protocol(
                        "a block part of an unexpected size".into(),
                    ));
                }
                local.push(p.as_mut_ptr() as usize);
            }
        }
    }
    let t_read = Instant::now();
    let bytes = match nixl.read(w, part, &local, NIXL_READ_TIMEOUT) {
        Ok(b) => b,
        Err(e) => {
            let _ = write_frame(&mut s, addr, &Frame::Error(e.to_string()));
            return Err(match e {
                crate::nixl::NixlError::Timeout(_) => KvError::InFlight(e.to_string()),
                e => transport(e),
            });
        }
    };
    write_frame(&mut s, addr, &Frame::Done)?;
    match read_frame(&mut s, addr)? {
        Frame::Done => {}
        Frame::Error(m) => return Err(KvError::Peer(m)),
        other => return Err(KvError::Protocol(format!("{other:?} after the NIXL read"))),
    }
    let t_done = Instant::now();
    tracing::debug!(
        ask_us = (t_ask - t0).as_micros() as u64,
        locate_us = (t_read - t_ask).as_micros() as u64,
        read_us = (t_done - t_read).as_micros() as u64,
        md_bytes = w.md.len() / 2,
        "NIXL load"
    );
    Ok(Loaded {
        n_tokens: meta.n_tokens,
        generated: meta.generated,
        sampler: meta.sampler,
        bytes,
    })
}
