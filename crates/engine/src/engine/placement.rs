//! Where and in which scheduling class an engine's compute threads run.
//!
//! A decode step keeps its core busy. A thread woken meanwhile (the HTTP task streaming the
//! step's tokens, a proxy, a KV transfer) runs only when the kernel preempts the step, which
//! under Linux's fair scheduler can wait for the next tick: up to 4 ms late per token at
//! 250 Hz. Under `SCHED_IDLE` the compute threads give way to any other thread at once.
//! Two engines on one machine (a prefill and a decode instance) can still land on the same
//! core and share it for a while; binding each to its own CPUs keeps them apart.

use std::fmt;

/// How the engine's compute threads are scheduled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ComputePriority {
    /// The default class, as for any thread.
    #[default]
    Normal,
    /// Linux's `SCHED_IDLE`: every other runnable thread goes first. For a machine
    /// dedicated to serving; other busy work there would starve the engine.
    Idle,
}

impl std::str::FromStr for ComputePriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "idle" => Ok(Self::Idle),
            other => Err(format!(
                "unknown compute priority {other:?} (expected normal or idle)"
            )),
        }
    }
}

impl fmt::Display for ComputePriority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Idle => "idle",
        })
    }
}

/// CPUs in `taskset -c` notation ("0-3,8"), in the order written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// CPU numbers past this are refused (the kernel's `cpu_set_t` holds 1024).
const MAX_CPU: usize = 1023;

impl CpuList {
    /// The CPUs this process may run on (its affinity), where the platform says.
    pub fn allowed() -> Option<CpuList> {
        allowed_cpus().map(CpuList)
    }

    /// Confines thread `tid` (of any process this one may manage) to these CPUs; the
    /// threads it starts later inherit that.
    pub fn confine_thread(&self, tid: i32) -> std::io::Result<()> {
        confine(tid, &self.0)
    }
}

/// Sets thread `tid`'s affinity to `cpus`.
#[cfg(target_os = "linux")]
fn confine(tid: i32, cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() || cpus.iter().any(|&c| c > MAX_CPU) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty CPU list, or a CPU past the last one Linux can name",
        ));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; every CPU fits it (checked above).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn confine(_tid: i32, _cpus: &[usize]) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "CPU affinity is implemented for Linux only",
    ))
}

impl std::str::FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c <= MAX_CPU)
                .ok_or_else(|| format!("bad CPU {x:?} in {s:?} (expected e.g. 0-3,8)"))
        };
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if lo > hi {
                return Err(format!("CPU range {part:?} runs backwards"));
            }
            for c in lo..=hi {
                if cpus.contains(&c) {
                    return Err(format!("CPU {c} appears twice in {s:?}"));
                }
                cpus.push(c);
            }
        }
        Ok(Self(cpus))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

/// Puts the calling thread in `p`'s class.
pub(super) fn apply_priority(p: ComputePriority) -> std::io::Result<()> {
    match p {
        ComputePriority::Normal => Ok(()),
        ComputePriority::Idle => set_idle(),
    }
}

#[cfg(target_os = "linux")]
fn set_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` outlives the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_idle() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SCHED_IDLE exists on Linux only",
    ))
}

/// CPU time the calling thread has used, where the platform tells.
#[cfg(target_os = "linux")]
pub(super) fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` outlives the call; the clock id is a constant the kernel knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    (r == 0).then(|| std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

#[cfg(not(target_os = "linux"))]
pub(super) fn thread_cpu_time() -> Option<std::time::Duration> {
    None
}

/// The CPUs this process may run on, if the platform says.
#[cfg(target_os = "linux")]
pub(super) fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        Some(
            (0..=MAX_CPU)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect(),
        )
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn allowed_cpus() -> Option<Vec<usize>> {
    None
}

/// Binds the calling thread to `cpu`.
#[cfg(target_os = "linux")]
pub(super) fn bind(cpu: usize) -> std::io::Result<()> {
    if cpu > MAX_CPU {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is past the last one Linux can name ({MAX_CPU})"),
        ));
    }
    // SAFETY: as in `allowed_cpus`; `cpu` fits the set (checked above).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn bind(_cpu: usize) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "binding threads to CPUs is implemented for Linux only",
    ))
}
