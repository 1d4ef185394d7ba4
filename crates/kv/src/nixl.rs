//! `NixlConnector`'s transport: the consumer READs the producer's held blocks straight from
//! the producer's KV pool into its own lent blocks through NIXL (UCX: shared memory or CMA
//! on one host, RDMA across hosts). Everything else is the TCP side channel's: the
//! handshake (secret, fingerprint), the grant, and the exchange that says where the blocks
//! lie (`NixlPull` answered by `Meta` with a [`Where`]) and when the read is over (the
//! consumer's `Done`, after which the producer frees them).
//!
//! Each side registers its whole pool once (the producer at its first pull, the consumer at
//! its first load). Registration is of the whole pool, so a consumer that holds the pair's
//! secret can read any block of the producer's pool, not only the ones granted: the pair is
//! one trust domain (docs/security.md). The library is loaded at run time (`nixl-sys`'s
//! `stub-api`): a process without it fails at start, saying what to install.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent, AgentConfig, MemType, MemoryRegion, NixlDescriptor, NotificationMap, RegistrationHandle,
    ThreadSync, XferDescList, XferOp, XferStatus,
};

/// Descriptors one read may carry (after merging neighbours): a prompt of 8,192 blocks in
/// 30 layers, scattered, is 491,520; more than this is a lie.
const MAX_DESCS: usize = 1 << 20;

/// A read of at least this many descriptors is shared among the UCX threads (NIXL's
/// `split_batch_size`; its default, 1,024, would never split ours: merged neighbours leave
/// about two per layer).
const SPLIT_AT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum NixlError {
    #[error("NixlConnector needs NIXL's libnixl_capi.so, which this process cannot load ({0}). Install it: `pip download nixl-cu12==1.5.1`, unzip the wheel, keep its folders .nixl_cu12.mesonpy.libs/ and nixl_cu12.libs/ side by side, and put the first on LD_LIBRARY_PATH (on a CPU-only host also set UCX_MODULES=^ib); docs/pd.md")]
    Missing(String),
    #[error("NIXL {what}: {source}")]
    Call {
        what: &'static str,
        source: nixl_sys::NixlError,
    },
    #[error("NIXL: {0}")]
    Protocol(String),
    /// The read did not end in time and may still be writing into the blocks.
    #[error("NIXL read of {0} bytes did not finish in time")]
    Timeout(u64),
}

fn call(what: &'static str) -> impl Fn(nixl_sys::NixlError) -> NixlError {
    move |source| NixlError::Call { what, source }
}

use crate::tcp::NixlWhere as Where;

/// A pool region as NIXL registers it.
#[derive(Debug)]
struct Region(usize, usize);

impl MemoryRegion for Region {
    unsafe fn as_ptr(&self) -> *const u8 {
        self.0 as *const u8
    }
    fn size(&self) -> usize {
        self.1
    }
}

impl NixlDescriptor for Region {
    fn mem_type(&self) -> MemType {
        MemType::Dram
    }
    fn device_id(&self) -> u64 {
        0
    }
}

/// This process's NIXL agent and what it registered.
pub struct Nixl {
    agent: Agent,
    name: String,
    registered: Mutex<Option<Registered>>,
    /// UCX has threads to share large reads among.
    split: bool,
    /// Reads of our blocks under way (producer): while there are any, a thread of ours
    /// drives the agent, which transports that are not one-sided (UCX over TCP) need.
    serving: (Mutex<usize>, Condvar),
}

/// One read of our blocks under way (see [`Nixl::serving`]).
pub(crate) struct Serving<'a>(&'a Nixl);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut n = self.0.serving.0.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
    }
}

/// The pool as registered (once).
struct Registered {
    regions: Vec<(usize, usize)>,
    /// Kept: dropping a handle deregisters its region.
    _handles: Vec<RegistrationHandle>,
    /// This agent's metadata once the pool is in it, in hex.
    md: String,
}

/// Checks that the library loads, before any call into the stubs (which abort without it).
fn library() -> Result<(), NixlError> {
    let name = c"libnixl_capi.so";
    // SAFETY: a constant NUL-terminated name; the handle is kept (the stubs load the same
    // library, and unloading it is never safe once used).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or null.
        let why = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "not found".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(NixlError::Missing(why));
    }
    Ok(())
}

impl Nixl {
    /// An agent with `backends` (e.g. `["UCX"]`), no progress thread (a busy-polling one
    /// costs a core on a small machine; whoever waits for a transfer drives it). UCX
    /// shares a read of [`SPLIT_AT`] descriptors or more among `threads` threads of its
    /// own, which sleep between reads: the copy waits on memory, so two threads move more
    /// than one even on two cores.
    pub fn new(role: &str, backends: &[String], threads: usize) -> Result<Arc<Self>, NixlError> {
        library()?;
        let name = format!(
            "splitserve-{role}-{}-{}",
            std::process::id(),
            crate::auth::hex(&crate::auth::random_bytes(4).unwrap_or_default())
        );
        let cfg = AgentConfig {
            enable_prog_thread: false,
            thread_sync: ThreadSync::Strict,
            ..AgentConfig::default()
        };
        let agent = Agent::new_configured(&name, &cfg).map_err(call("agent"))?;
        for b in backends {
            let (_, mut params) = agent.get_plugin_params(b).map_err(|e| {
                NixlError::Protocol(format!("backend {b}: {e} (is its plugin installed?)"))
            })?;
            if b == "UCX" {
                // UCX's shared-memory transports work only without its peer error handling.
                params
                    .set("ucx_error_handling_mode", "none")
                    .map_err(call("UCX parameters"))?;
                if threads > 0 {
                    params
                        .set("num_threads", &threads.to_string())
                        .map_err(call("UCX parameters"))?;
                    params
                        .set("split_batch_size", &SPLIT_AT.to_string())
                        .map_err(call("UCX parameters"))?;
                }
            }
            agent
                .create_backend(b, &params)
                .map_err(call("create backend"))?;
        }
        tracing::info!(agent = %name, ?backends, threads, "NIXL agent ready");
        let split = threads > 0 && backends.iter().any(|b| b == "UCX");
        let this = Arc::new(Self {
            agent,
            name,
            split,
            registered: Mutex::new(None),
            serving: (Mutex::new(0), Condvar::new()),
        });
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("nixl-progress".into())
            .spawn(move || progress(weak))
            .map_err(|e| NixlError::Protocol(format!("cannot start its progress thread: {e}")))?;
        Ok(this)
    }

    /// Marks a read of our blocks under way until the guard drops.
    pub(crate) fn serving(&self) -> Serving<'_> {
        *self.serving.0.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.serving.1.notify_all();
        Serving(self)
    }

    /// Registers the pool `regions` (once; later calls with the same regions do nothing)
    /// and returns the agent's metadata, in hex.
    pub fn register(&self, regions: &[(usize, usize)]) -> Result<String, NixlError> {
        let mut r = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(have) = r.as_ref() {
            if have.regions.as_slice() == regions {
                return Ok(have.md.clone());
            }
            return Err(NixlError::Protocol("the KV pool moved".into()));
        }
        let mut handles = Vec::with_capacity(regions.len());
        for &(a, n) in regions {
            handles.push(
                self.agent
                    .register_memory(&Region(a, n), None)
                    .map_err(call("register the KV pool"))?,
            );
        }
        let md = crate::auth::hex(&self.agent.get_local_md().map_err(call("metadata"))?);
        *r = Some(Registered {
            regions: regions.to_vec(),
            _handles: handles,
            md: md.clone(),
        });
        Ok(md)
    }

    /// Producer: where `blocks` (per layer, their places in its regions) lie, for a
    /// consumer to read.
    pub(crate) fn at(
        &self,
        regions: &[(usize, usize)],
        blocks: &[Vec<u32>],
    ) -> Result<Where, NixlError> {
        let md = self.register(regions)?;
        Ok(Where {
            agent: self.name.clone(),
            md,
            regions: regions.iter().map(|&(a, n)| (a as u64, n as u64)).collect(),
            blocks: blocks.to_vec(),
        })
    }

    /// Consumer: reads the blocks `w` names into `local` (for each layer, the K part of
    /// every block it names for that layer in position order, then their V parts; every
    /// part `part` bytes), within `timeout`. Parts that neighbour each other on both sides
    /// go as one descriptor. Returns the bytes read.
    pub(crate) fn read(
        &self,
        w: &Where,
        part: usize,
        local: &[usize],
        timeout: Duration,
    ) -> Result<u64, NixlError> {
        let n_layer = w.regions.len() / 2;
        if w.regions.len() != 2 * n_layer || n_layer == 0 {
            return Err(NixlError::Protocol(format!(
                "{} pool regions; a pool has a K and a V region per layer",
                w.regions.len()
            )));
        }
        let offered = 2 * w.blocks.iter().map(Vec::len).sum::<usize>();
        if w.blocks.len() != n_layer || local.len() != offered {
            return Err(NixlError::Protocol(format!(
                "{offered} parts in {} layers offered for {} parts in {n_layer}",
                w.blocks.len(),
                local.len()
            )));
        }
        // Every remote part lies inside its region (the producer's registration would
        // refuse the rest; we do not ask).
        let mut remote = Vec::with_capacity(local.len());
        for (i, &(base, len)) in w.regions.iter().enumerate() {
            for &b in &w.blocks[i / 2] {
                let off = b as u64 * part as u64;
                let end = off.checked_add(part as u64);
                match (end, base.checked_add(off)) {
                    (Some(end), Some(at)) if end <= len && base.checked_add(len).is_some() => {
                        remote.push(at)
                    }
                    _ => {
                        return Err(NixlError::Protocol(format!(
                            "block {b} lies outside the producer's pool"
                        )))
                    }
                }
            }
        }
        let t_md = Instant::now();
        let md = unhex(&w.md).ok_or_else(|| NixlError::Protocol("metadata is not hex".into()))?;
        let peer = if self.agent.check_remote_metadata(&w.agent, None) {
            w.agent.clone()
        } else {
            self.agent
                .load_remote_md(&md)
                .map_err(call("load metadata"))?
        };
        if peer != w.agent {
            return Err(NixlError::Protocol(format!(
                "metadata of agent {peer} offered as {}",
                w.agent
            )));
        }
        // Neighbouring parts on both sides become one descriptor.
        let (mut ld, mut rd) = (
            XferDescList::new(MemType::Dram).map_err(call("descriptors"))?,
            XferDescList::new(MemType::Dram).map_err(call("descriptors"))?,
        );
        let mut runs = 0usize;
        let mut i = 0;
        while i < local.len() {
            let mut j = i + 1;
            while j < local.len()
                && local[j - 1].checked_add(part) == Some(local[j])
                && remote[j - 1].checked_add(part as u64) == Some(remote[j])
            {
                j += 1;
            }
            ld.add_desc(local[i], (j - i) * part, 0);
            rd.add_desc(remote[i] as usize, (j - i) * part, 0);
            runs += 1;
            if runs > MAX_DESCS {
                return Err(NixlError::Protocol("too many descriptors".into()));
            }
            i = j;
        }
        let bytes = (local.len() * part) as u64;
        let t_req = Instant::now();
        let req = self
            .agent
            .create_xfer_req(XferOp::Read, &ld, &rd, &peer, None)
            .map_err(call("transfer request"))?;
        let t_post = Instant::now();
        let deadline = Instant::now() + timeout;
        // A split read runs in UCX's threads and ends only when all its parts have (so an
        // error leaves none of them writing); this thread only watches, and must leave them
        // the cores. Otherwise this thread drives the copy.
        let split = self.split && runs >= SPLIT_AT;
        let mut going = self.agent.post_xfer_req(&req, None).map_err(call("post"))?;
        while going {
            if Instant::now() > deadline {
                return Err(NixlError::Timeout(bytes));
            }
            going = match self.agent.get_xfer_status(&req).map_err(call("transfer"))? {
                XferStatus::InProgress => true,
                XferStatus::Success => false,
            };
            if going && split {
                std::thread::sleep(Duration::from_micros(50));
            } else if going {
                std::thread::yield_now();
            }
        }
        tracing::debug!(
            descriptors = runs,
            split,
            peer_us = (t_req - t_md).as_micros() as u64,
            prepare_us = (t_post - t_req).as_micros() as u64,
            transfer_us = t_post.elapsed().as_micros() as u64,
            "NIXL read"
        );
        Ok(bytes)
    }
}

/// Hex to bytes (an agent's metadata: it arrived in a control frame, so it is bounded).
fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Drives the agent while reads of our blocks are under way; sleeps otherwise, and ends
/// with the agent.
fn progress(nixl: Weak<Nixl>) {
    let mut notifs = match NotificationMap::new() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "NIXL progress thread cannot start; reads over non-one-sided transports will time out");
            return;
        }
    };
    loop {
        let Some(n) = nixl.upgrade() else { return };
        let busy = {
            let g = n.serving.0.lock().unwrap_or_else(|e| e.into_inner());
            let (g, _) = n
                .serving
                .1
                .wait_timeout_while(g, Duration::from_millis(200), |c| *c == 0)
                .unwrap_or_else(|e| e.into_inner());
            *g > 0
        };
        if busy {
            // Progresses the backends' workers; the notifications it collects are unused.
            let _ = n.agent.get_notifications(&mut notifs, None);
            let _ = notifs.take_notifs();
            drop(n);
            // A short nap: a busy loop would take a core from the engines for the whole read.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
