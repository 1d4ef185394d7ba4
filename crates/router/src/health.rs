//! Per-instance health: a circuit breaker fed by requests and by the `/health` poller.
//!
//! Closed: the instance gets requests. `failure_threshold` failures in a row (a connect
//! error, a 5xx, a failed poll) open it: no requests for `cooldown`. Then it is half-open:
//! the next poll or request decides; `success_threshold` successes in a row close it, one
//! failure opens it again.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub cooldown: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            success_threshold: 1,
            cooldown: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    t: Thresholds,
    failures: u32,
    successes: u32,
    opened: Option<Instant>,
}

impl Breaker {
    pub fn new(t: Thresholds) -> Self {
        Self {
            t,
            failures: 0,
            successes: 0,
            opened: None,
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.opened {
            None => State::Closed,
            Some(at) if now.duration_since(at) < self.t.cooldown => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    /// Whether requests may go there now.
    pub fn available(&self, now: Instant) -> bool {
        self.state(now) != State::Open
    }

    pub fn success(&mut self, now: Instant) {
        self.failures = 0;
        match self.state(now) {
            State::Closed => {}
            State::Open => {}
            State::HalfOpen => {
                self.successes += 1;
                if self.successes >= self.t.success_threshold {
                    self.opened = None;
                    self.successes = 0;
                }
            }
        }
    }

    /// Records a failure; whether this one opened the circuit.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.successes = 0;
        match self.state(now) {
            State::Closed => {
                self.failures += 1;
                if self.failures >= self.t.failure_threshold {
                    self.opened = Some(now);
                    self.failures = 0;
                    return true;
                }
                false
            }
            State::HalfOpen => {
                self.opened = Some(now);
                true
            }
            State::Open => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_after_a_probe() {
        let t = Thresholds {
            failure_threshold: 3,
            success_threshold: 2,
            cooldown: Duration::from_secs(5),
        };
        let mut b = Breaker::new(t);
        let t0 = Instant::now();
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        b.success(t0);
        // A success in between starts the count again.
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert_eq!(b.state(t0), State::Closed);
        assert!(b.failure(t0), "the third in a row opens it");
        assert!(!b.available(t0 + Duration::from_millis(4999)));
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.state(later), State::HalfOpen);
        assert!(b.available(later));
        // A failure while half-open opens it again, for another cooldown.
        assert!(b.failure(later));
        assert_eq!(b.state(later + Duration::from_secs(1)), State::Open);
        let again = later + Duration::from_secs(5);
        b.success(again);
        assert_eq!(b.state(again), State::HalfOpen, "one of two successes");
        b.success(again);
        assert_eq!(b.state(again), State::Closed);
        // Successes while open (too early) do not close it.
        let mut b = Breaker::new(t);
        for _ in 0..3 {
            b.failure(t0);
        }
        b.success(t0);
        b.success(t0);
        assert_eq!(b.state(t0), State::Open);
    }
}
