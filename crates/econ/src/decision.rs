//! Whether disaggregation pays for one request shape, and how to size xPyD for a workload.

use serde::Serialize;

use crate::link::{exposed_time, transfer_time, Link};
use crate::shape::{freight, KvFormat, ModelShape};

/// How long a prefill takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PrefillRate {
    /// FLOPs model: 2 × params × tokens + attention 2 × layers × tokens² × heads·head_dim
    /// (causal: half of the 4·n²·d of QKᵀ and AV; a windowed layer's queries see at most its
    /// window), at `flops_per_s` (peak × MFU).
    Flops { flops_per_s: f64 },
    /// Measured (or given) tokens per second of one prefill instance.
    Measured { tokens_per_s: f64 },
}

impl PrefillRate {
    pub fn seconds(&self, shape: &ModelShape, q_width: u64, tokens: u64) -> f64 {
        match self {
            PrefillRate::Measured { tokens_per_s } => tokens as f64 / tokens_per_s,
            PrefillRate::Flops { flops_per_s } => {
                let n = tokens as f64;
                let linear = 2.0 * shape.params as f64 * n;
                let attn = 4.0 * shape.attention_pairs(n) * q_width as f64;
                (linear + attn) / flops_per_s
            }
        }
    }
}

/// One request on one deployment.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub shape: ModelShape,
    /// Query width (heads × head dim) for the attention FLOPs.
    pub q_width: u64,
    pub kv_format: KvFormat,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    pub block_size: u64,
    pub link: Link,
    pub efficiency: f64,
    pub overlap: bool,
    pub prefill: PrefillRate,
    /// A decode step of the running batch, seconds.
    pub decode_step_s: f64,
    /// Colocated chunked-prefill budget per step, tokens.
    pub chunk_tokens: u64,
    pub itl_slo_s: f64,
    /// Free KV blocks in the decode pool.
    pub decode_free_blocks: u64,
}

/// The numbers behind a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Numbers {
    pub kv_bytes: u64,
    pub blocks_needed: u64,
    pub prefill_s: f64,
    pub transfer_s: f64,
    /// Added to TTFT by the link (after overlap).
    pub exposed_transfer_s: f64,
    /// Worst colocated ITL while this prompt prefills: decode step + one chunk.
    pub colocated_itl_s: f64,
    /// Total stall the running decodes avoid: the prompt's prefill time.
    pub stall_avoided_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Decision {
    Pay {
        numbers: Numbers,
    },
    /// The decode pool cannot take the incoming KV.
    DontPayDecodePoolFull {
        numbers: Numbers,
        free_blocks: u64,
    },
    /// Colocated chunked prefill already meets the ITL SLO: no interference to remove.
    DontPayPromptTooShort {
        numbers: Numbers,
    },
    /// The link costs more time than the decode side gains.
    DontPayLinkTooSlow {
        numbers: Numbers,
    },
}

impl Decision {
    pub fn pays(&self) -> bool {
        matches!(self, Decision::Pay { .. })
    }

    pub fn numbers(&self) -> &Numbers {
        match self {
            Decision::Pay { numbers }
            | Decision::DontPayDecodePoolFull { numbers, .. }
            | Decision::DontPayPromptTooShort { numbers }
            | Decision::DontPayLinkTooSlow { numbers } => numbers,
        }
    }

    pub fn reason(&self) -> String {
        let n = self.numbers();
        let ms = |s: f64| s * 1e3;
        match self {
            Decision::Pay { .. } => format!(
                "pays: colocated ITL would reach {:.1} ms (> SLO) while the link adds only {:.1} ms to TTFT against {:.1} ms of decode stall avoided",
                ms(n.colocated_itl_s), ms(n.exposed_transfer_s), ms(n.stall_avoided_s)
            ),
            Decision::DontPayDecodePoolFull { free_blocks, .. } => format!(
                "does not pay: the decode pool has {free_blocks} free blocks, the KV needs {}",
                n.blocks_needed
            ),
            Decision::DontPayPromptTooShort { .. } => format!(
                "does not pay: colocated with chunked prefill the worst ITL is {:.1} ms, within the SLO; the prompt is too short to interfere",
                ms(n.colocated_itl_s)
            ),
            Decision::DontPayLinkTooSlow { .. } => format!(
                "does not pay: the link adds {:.1} ms, more than the {:.1} ms of decode stall it would avoid",
                ms(n.exposed_transfer_s), ms(n.stall_avoided_s)
            ),
        }
    }
}

/// A policy that decides one request: the shape of Dynamo's conditional disaggregation.
pub trait DisaggPolicy {
    fn decide(&self, s: &Scenario) -> Decision;
}

/// The default policy. In order:
/// 1. blocks_needed = ceil((prompt + output) / block_size) > free blocks → pool full;
/// 2. decode_step + min(prompt, chunk) / prefill_rate ≤ ITL SLO → prompt too short;
/// 3. exposed transfer > prefill time of the prompt (the stall avoided) → link too slow;
/// 4. otherwise pay.
pub struct DefaultPolicy;

pub fn numbers(s: &Scenario) -> Numbers {
    let f = freight(&s.shape, s.kv_format, s.prompt_tokens, s.block_size);
    let prefill_s = s.prefill.seconds(&s.shape, s.q_width, s.prompt_tokens);
    let transfer_s = transfer_time(&s.link, f.block_bytes, s.efficiency);
    let exposed = if s.overlap {
        exposed_time(transfer_s, prefill_s, s.shape.layers)
    } else {
        transfer_s
    };
    let chunk = s.prompt_tokens.min(s.chunk_tokens.max(1));
    let chunk_s = s.prefill.seconds(&s.shape, s.q_width, chunk);
    Numbers {
        kv_bytes: f.block_bytes,
        blocks_needed: (s.prompt_tokens + s.output_tokens).div_ceil(s.block_size.max(1)),
        prefill_s,
        transfer_s,
        exposed_transfer_s: exposed,
        colocated_itl_s: s.decode_step_s + chunk_s,
        stall_avoided_s: prefill_s,
    }
}

impl DisaggPolicy for DefaultPolicy {
    fn decide(&self, s: &Scenario) -> Decision {
        let n = numbers(s);
        if n.blocks_needed > s.decode_free_blocks {
            return Decision::DontPayDecodePoolFull {
                numbers: n,
                free_blocks: s.decode_free_blocks,
            };
        }
        if n.colocated_itl_s <= s.itl_slo_s {
            return Decision::DontPayPromptTooShort { numbers: n };
        }
        if n.exposed_transfer_s > n.stall_avoided_s {
            return Decision::DontPayLinkTooSlow { numbers: n };
        }
        Decision::Pay { numbers: n }
    }
}

/// A workload and per-instance capacities, for the planner.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub request_rate: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
    pub ttft_slo_s: f64,
    pub itl_slo_s: f64,
    /// Prompt tokens per second one instance prefills.
    pub prefill_tok_s: f64,
    /// Output tokens per second one decode instance sustains within the ITL SLO.
    pub decode_tok_s: f64,
    /// Decode step time of a colocated instance, and its chunk budget.
    pub decode_step_s: f64,
    pub chunk_tokens: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Prefill instances: ceil(rate × input / prefill capacity).
    pub prefill_instances: u64,
    /// Decode instances: ceil(rate × output / decode capacity).
    pub decode_instances: u64,
    /// Colocated instances: ceil(rate × (input / prefill cap + output / decode cap)).
    pub colocated_instances: u64,
    /// Worst colocated ITL: decode step + one chunk's prefill.
    pub colocated_itl_s: f64,
    pub recommend_disaggregated: bool,
    pub why: String,
}

pub fn plan(w: &Workload) -> Plan {
    let x = (w.request_rate * w.input_tokens / w.prefill_tok_s)
        .ceil()
        .max(1.0) as u64;
    let y = (w.request_rate * w.output_tokens / w.decode_tok_s)
        .ceil()
        .max(1.0) as u64;
    let busy =
        w.request_rate * (w.input_tokens / w.prefill_tok_s + w.output_tokens / w.decode_tok_s);
    let colo = busy.ceil().max(1.0) as u64;
    let itl = w.decode_step_s + w.chunk_tokens.min(w.input_tokens) / w.prefill_tok_s;
    let (dis, why) = if itl > w.itl_slo_s {
        (
            true,
            format!(
                "colocated ITL would be {:.1} ms > SLO {:.1} ms: run {x}P{y}D",
                itl * 1e3,
                w.itl_slo_s * 1e3
            ),
        )
    } else if x + y < colo {
        (
            true,
            format!(
                "{x}P{y}D needs fewer instances ({}) than colocated ({colo})",
                x + y
            ),
        )
    } else {
        (false, format!("colocated meets the ITL SLO ({:.1} ms) with {colo} instance(s) (≤ {} for {x}P{y}D)", itl * 1e3, x + y))
    };
    Plan {
        prefill_instances: x,
        decode_instances: y,
        colocated_instances: colo,
        colocated_itl_s: itl,
        recommend_disaggregated: dis,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::preset as link;
    use crate::shape::preset;

    fn scenario(link_name: &str, prompt: u64) -> Scenario {
        Scenario {
            shape: preset("Llama-3.1-8B").expect("preset"),
            q_width: 32 * 128,
            kv_format: KvFormat::F16,
            prompt_tokens: prompt,
            output_tokens: 256,
            block_size: 16,
            link: link(link_name).expect("link"),
            efficiency: 1.0,
            overlap: false,
            // An H100-class GPU at ~40% MFU: 400 TFLOP/s.
            prefill: PrefillRate::Flops { flops_per_s: 4e14 },
            decode_step_s: 0.015,
            chunk_tokens: 2048,
            itl_slo_s: 0.030,
            decode_free_blocks: 10_000,
        }
    }

    #[test]
    fn slow_link_does_not_pay() {
        let s = scenario("10gbe", 2048);
        let d = DefaultPolicy.decide(&s);
        assert!(matches!(d, Decision::DontPayLinkTooSlow { .. }), "{d:?}");
        let n = d.numbers();
        assert_eq!(n.kv_bytes, 256 * 1024 * 1024);
        // 215 ms of line rate, 228 with TCP's and Ethernet's headers.
        assert_eq!((n.transfer_s * 1e3).round(), 228.0);
        // 2·8.03e9·2048 + 2·32·2048²·4096 = 3.2892e13 + 1.0995e12 FLOPs at 4e14 → 85.0 ms.
        assert_eq!((n.prefill_s * 1e3).round(), 85.0);
        assert!(n.exposed_transfer_s > n.stall_avoided_s);
    }

    #[test]
    fn fast_fabric_pays() {
        let d = DefaultPolicy.decide(&scenario("ib-200", 2048));
        assert!(d.pays(), "{d:?}");
        assert_eq!((d.numbers().transfer_s * 1e3).round(), 11.0);
    }

    #[test]
    fn short_prompt_does_not_pay() {
        // 64 tokens prefill in ~2.6 ms: 15 + 2.6 ms < 30 ms SLO.
        let d = DefaultPolicy.decide(&scenario("ib-200", 64));
        assert!(matches!(d, Decision::DontPayPromptTooShort { .. }), "{d:?}");
    }

    #[test]
    fn full_decode_pool_does_not_pay() {
        let mut s = scenario("ib-200", 2048);
        // (2048 + 256) / 16 = 144 blocks needed.
        s.decode_free_blocks = 143;
        let d = DefaultPolicy.decide(&s);
        assert_eq!(d.numbers().blocks_needed, 144);
        assert!(
            matches!(
                d,
                Decision::DontPayDecodePoolFull {
                    free_blocks: 143,
                    ..
                }
            ),
            "{d:?}"
        );
        s.decode_free_blocks = 144;
        assert!(DefaultPolicy.decide(&s).pays());
    }

    #[test]
    fn boundary_of_prompt_too_short() {
        let mut s = scenario("ib-200", 2048);
        s.prefill = PrefillRate::Measured {
            tokens_per_s: 10_000.0,
        };
        s.chunk_tokens = 150; // 15 ms chunk + 15 ms step = exactly the 30 ms SLO
        s.decode_step_s = 0.015;
        s.itl_slo_s = 0.030;
        assert!(matches!(
            DefaultPolicy.decide(&s),
            Decision::DontPayPromptTooShort { .. }
        ));
        s.chunk_tokens = 151;
        assert!(DefaultPolicy.decide(&s).pays());
    }

    #[test]
    fn overlap_can_turn_a_slow_link_into_a_paying_one() {
        let mut s = scenario("25gbe", 2048);
        assert!(matches!(
            DefaultPolicy.decide(&s),
            Decision::DontPayLinkTooSlow { .. }
        ));
        s.overlap = true;
        s.prefill = PrefillRate::Measured {
            tokens_per_s: 2048.0 / 0.2,
        };
        // transfer 85.9 ms, prefill 200 ms: exposed = last layer's share, 2.7 ms.
        let d = DefaultPolicy.decide(&s);
        assert!(d.pays(), "{d:?}");
        assert!((d.numbers().exposed_transfer_s - d.numbers().transfer_s / 32.0).abs() < 1e-12);
    }

    #[test]
    fn planner_on_a_hand_computed_case() {
        let w = Workload {
            request_rate: 10.0,
            input_tokens: 1000.0,
            output_tokens: 200.0,
            ttft_slo_s: 1.0,
            itl_slo_s: 0.05,
            prefill_tok_s: 5000.0,
            decode_tok_s: 1000.0,
            decode_step_s: 0.02,
            chunk_tokens: 512.0,
        };
        let p = plan(&w);
        // x = ceil(10·1000/5000) = 2, y = ceil(10·200/1000) = 2, colocated = ceil(10·(0.2+0.2)) = 4;
        // colocated ITL = 20 ms + 512/5000 s = 122.4 ms > 50 ms → 2P2D.
        assert_eq!(
            (
                p.prefill_instances,
                p.decode_instances,
                p.colocated_instances
            ),
            (2, 2, 4)
        );
        assert!((p.colocated_itl_s - 0.1224).abs() < 1e-12);
        assert!(p.recommend_disaggregated);
        let easy = Workload {
            chunk_tokens: 100.0,
            itl_slo_s: 0.1,
            ..w
        };
        let p = plan(&easy);
        assert!(!p.recommend_disaggregated, "{}", p.why);
    }
}
