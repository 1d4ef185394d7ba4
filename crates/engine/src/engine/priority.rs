//! The scheduling class of an engine's compute threads.
//!
//! A decode step keeps its core busy. A thread woken meanwhile (the HTTP task streaming the
//! step's tokens, a proxy, a KV transfer) runs only when the kernel preempts the step, which
//! under Linux's fair scheduler can wait for the next tick: up to 4 ms late per token at
//! 250 Hz. Under `SCHED_IDLE` the compute threads give way to any other thread at once.

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

/// Puts the calling thread in `p`'s class.
pub(super) fn apply(p: ComputePriority) -> std::io::Result<()> {
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
