//! The router's own Prometheus metrics (prefix `splitserve:router_`), served on the proxy's
//! `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::health::State;
use crate::pool::Pool;

pub struct Metrics {
    registry: Registry,
    /// Requests sent, by pool and instance.
    pub requests: IntCounterVec,
    /// Failures (unreachable, 5xx), by pool and instance.
    pub errors: IntCounterVec,
    /// Sends moved on to another instance before the first byte.
    pub retries: IntCounter,
    /// Requests prefilled on their decode instance instead of a prefill instance, by reason.
    pub fallbacks: IntCounterVec,
    /// Requests sent through a prefill instance (disaggregated).
    pub disaggregated: IntCounter,
    /// Streams continued on another decode instance after theirs died.
    pub failovers: IntCounter,
    circuit: IntGaugeVec,
    /// Time from arrival to the request leaving for its (first) instance.
    pub queue: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let name = |n: &str| format!("splitserve:router_{n}");
        let by_instance = ["pool", "instance"];
        let m = Self {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                Opts::new(name("requests_total"), "Requests sent, by instance."),
                &by_instance,
            )
            .expect("valid metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    name("errors_total"),
                    "Requests that failed at an instance (unreachable or 5xx).",
                ),
                &by_instance,
            )
            .expect("valid metric"),
            retries: IntCounter::new(
                name("retries_total"),
                "Sends moved to another instance before the first byte.",
            )
            .expect("valid metric"),
            fallbacks: IntCounterVec::new(
                Opts::new(
                    name("fallbacks_total"),
                    "Requests prefilled on their decode instance instead of a prefill instance.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            disaggregated: IntCounter::new(
                name("disaggregated_total"),
                "Requests prefilled on a prefill instance and decoded on a decode instance.",
            )
            .expect("valid metric"),
            failovers: IntCounter::new(
                name("failovers_total"),
                "Requests continued or run again on another instance after theirs died with them.",
            )
            .expect("valid metric"),
            circuit: IntGaugeVec::new(
                Opts::new(
                    name("circuit_state"),
                    "Circuit breaker per instance: 0 closed, 1 half-open, 2 open.",
                ),
                &by_instance,
            )
            .expect("valid metric"),
            queue: HistogramVec::new(
                HistogramOpts::new(
                    name("queue_seconds"),
                    "Time in the router before the request leaves for an instance.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["pool"],
            )
            .expect("valid metric"),
        };
        for c in [&m.requests, &m.errors, &m.fallbacks] {
            let _ = m.registry.register(Box::new(c.clone()));
        }
        let _ = m.registry.register(Box::new(m.retries.clone()));
        let _ = m.registry.register(Box::new(m.disaggregated.clone()));
        let _ = m.registry.register(Box::new(m.failovers.clone()));
        let _ = m.registry.register(Box::new(m.circuit.clone()));
        let _ = m.registry.register(Box::new(m.queue.clone()));
        m
    }

    pub fn render(&self, pools: &[Pool]) -> String {
        for p in pools {
            for i in p.instances() {
                let v = match i.state() {
                    State::Closed => 0,
                    State::HalfOpen => 1,
                    State::Open => 2,
                };
                self.circuit.with_label_values(&[p.name, &i.url]).set(v);
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
