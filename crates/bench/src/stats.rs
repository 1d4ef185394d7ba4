//! Latency statistics: percentiles, summaries, goodput, and the inter-token gaps of a stream.

use serde::Serialize;

/// Percentile by linear interpolation between closest ranks (numpy's default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// The 99.9th percentile: where a rare stall (a few steps per minute) shows.
    pub p99_9: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let mean = if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        Self {
            count: v.len(),
            mean,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            p99_9: percentile(&v, 99.9),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Gaps between consecutive token arrival times (seconds): the inter-token latencies.
pub fn inter_token_gaps(arrivals: &[f64]) -> Vec<f64> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Whether a streamed completion chunk carries a generated token.
///
/// A token whose text is still incomplete (the first bytes of a multi-byte character) comes
/// with empty text; it is a token all the same, or two steps would be timed as one gap. The
/// closing chunk (empty text with a finish reason) and the usage chunk carry none.
pub fn chunk_has_token(chunk: &serde_json::Value) -> bool {
    chunk["choices"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["token_ids"].is_array()
                || match c["text"].as_str() {
                    Some(t) => !t.is_empty() || c["finish_reason"].is_null(),
                    None => false,
                }
        })
    })
}

/// One request's measurements, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    pub ok: bool,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub start_s: f64,
    pub ttft_ms: f64,
    pub e2e_ms: f64,
    pub itl_ms: Vec<f64>,
    /// Prompt tokens the server found in its prefix cache, where it reports them
    /// (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: Option<usize>,
}

/// DistServe's goodput: completed requests meeting both the TTFT and the ITL SLO, per second.
/// A request meets the ITL SLO when its mean inter-token latency is within it (vLLM's
/// convention for `--goodput tpot:...`). Returns (share meeting, goodput req/s).
pub fn goodput(
    results: &[RequestResult],
    slo_ttft_ms: f64,
    slo_itl_ms: f64,
    duration_s: f64,
) -> (f64, f64) {
    if results.is_empty() || duration_s <= 0.0 {
        return (0.0, 0.0);
    }
    let good = results
        .iter()
        .filter(|r| {
            let mean_itl = if r.itl_ms.is_empty() {
                0.0
            } else {
                r.itl_ms.iter().sum::<f64>() / r.itl_ms.len() as f64
            };
            r.ok && r.ttft_ms <= slo_ttft_ms && mean_itl <= slo_itl_ms
        })
        .count();
    (good as f64 / results.len() as f64, good as f64 / duration_s)
}

/// Splits an SSE byte stream into `data:` payloads as they complete.
#[derive(Default)]
pub struct SseParser {
    buf: String,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let event: String = self.buf.drain(..end + 2).collect();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    out.push(d.trim_start().to_string());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_match_hand_computed_values() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        // rank 0.9 * 4 = 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
        assert!((percentile(&v, 90.0) - 7.6).abs() < 1e-12);
        // rank 3.96 -> 4 + 0.96 * 6 = 9.76
        assert!((percentile(&v, 99.0) - 9.76).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 10.0);
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
        let s = Summary::of(&[10.0, 1.0, 4.0, 3.0, 2.0]);
        assert_eq!(s.count, 5);
        assert_eq!(s.mean, 4.0);
        assert_eq!(s.p50, 3.0);
        // rank 0.999 * 4 = 3.996 -> 4 + 0.996 * 6 = 9.976
        assert!((s.p99_9 - 9.976).abs() < 1e-12);
        assert_eq!(s.max, 10.0);
    }

    fn r(ttft: f64, itl: &[f64]) -> RequestResult {
        RequestResult {
            ok: true,
            error: None,
            prompt_tokens: 1,
            output_tokens: itl.len() + 1,
            start_s: 0.0,
            ttft_ms: ttft,
            e2e_ms: ttft + itl.iter().sum::<f64>(),
            itl_ms: itl.to_vec(),
            cached_tokens: None,
        }
    }

    #[test]
    fn goodput_counts_requests_meeting_both_slos() {
        let rs = vec![
            r(100.0, &[10.0, 20.0]), // meets both (mean ITL 15)
            r(300.0, &[10.0]),       // TTFT too slow
            r(100.0, &[40.0, 40.0]), // ITL too slow
            r(200.0, &[20.0, 20.0]), // exactly on both SLOs: meets
        ];
        let (share, gp) = goodput(&rs, 200.0, 20.0, 2.0);
        assert_eq!(share, 0.5);
        assert_eq!(gp, 1.0);
        let mut failed = r(1.0, &[1.0]);
        failed.ok = false;
        assert_eq!(goodput(&[failed], 200.0, 20.0, 1.0), (0.0, 0.0));
    }

    #[test]
    fn itl_extraction_from_an_sse_stream() {
        let mut p = SseParser::default();
        // Events split across reads at awkward places.
        let mut got = p.push(b"data: {\"a\":1}\n\ndata: {\"a\"");
        assert_eq!(got, vec!["{\"a\":1}".to_string()]);
        got = p.push(b":2}\n\n: keep-alive\n\ndata: [DONE]\n\n");
        assert_eq!(got, vec!["{\"a\":2}".to_string(), "[DONE]".to_string()]);
        let arrivals = [0.100, 0.120, 0.150, 0.151];
        let gaps: Vec<f64> = inter_token_gaps(&arrivals)
            .iter()
            .map(|g| (g * 1000.0f64).round())
            .collect();
        assert_eq!(gaps, vec![20.0, 30.0, 1.0]);
        assert!(inter_token_gaps(&[1.0]).is_empty());
    }

    #[test]
    fn which_chunks_carry_a_token() {
        let has = |s: &str| chunk_has_token(&serde_json::from_str(s).expect("json"));
        assert!(has(r#"{"choices":[{"text":" a","finish_reason":null}]}"#));
        // Half of a multi-byte character: no text yet, but a token.
        assert!(has(r#"{"choices":[{"text":"","finish_reason":null}]}"#));
        assert!(has(
            r#"{"choices":[{"text":"!","finish_reason":"length"}]}"#
        ));
        assert!(has(
            r#"{"choices":[{"text":"","token_ids":[7],"finish_reason":"stop"}]}"#
        ));
        // The closing chunk and the usage chunk.
        assert!(!has(
            r#"{"choices":[{"text":"","finish_reason":"length"}]}"#
        ));
        assert!(!has(r#"{"choices":[],"usage":{"completion_tokens":3}}"#));
        assert!(!has(r#"{"error":{"message":"x"}}"#));
    }
}
