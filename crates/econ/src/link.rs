//! Links between prefill and decode instances, and the time a prompt's KV takes on one.

use std::io::{Read, Write};
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    pub name: String,
    /// Payload bandwidth in bytes per second.
    pub bytes_per_s: f64,
    /// Fixed cost per transfer (handshake, first byte), seconds.
    pub latency_s: f64,
    /// Share of the line rate left for the KV once every packet's headers are paid (1 for a
    /// link whose rate is already a payload rate).
    pub payload_share: f64,
}

/// TCP over Ethernet at `mtu`: a packet carries `mtu` − 52 bytes of payload (IP and TCP
/// headers, TCP's timestamp option) in `mtu` + 38 bytes of line time (Ethernet header and
/// FCS, preamble, inter-frame gap): 94.1 % at 1,500, 99.0 % at 9,000. Measured across a
/// shaped link, leaving it out made every transfer 4–5 % slower than predicted.
pub fn tcp_over_ethernet(mtu: f64) -> f64 {
    ((mtu - 52.0) / (mtu + 38.0)).clamp(0.01, 1.0)
}

/// Nominal figures: NVLink 4 per direction, InfiniBand NDR/HDR, Ethernet line rates,
/// PCIe 4.0 ×16.
pub fn presets() -> Vec<Link> {
    let l = |name: &str, gb_per_s: f64, latency_us: f64| Link {
        name: name.into(),
        bytes_per_s: gb_per_s * 1e9,
        latency_s: latency_us * 1e-6,
        // Ethernet carries TCP at the common MTU; the fabrics' figures are payload rates.
        payload_share: if name.ends_with("gbe") {
            tcp_over_ethernet(1500.0)
        } else {
            1.0
        },
    };
    vec![
        l("nvlink", 450.0, 5.0),
        l("ib-400", 50.0, 10.0),
        l("ib-200", 25.0, 10.0),
        l("100gbe", 12.5, 30.0),
        l("25gbe", 3.125, 50.0),
        l("10gbe", 1.25, 50.0),
        l("pcie", 25.0, 10.0),
    ]
}

pub fn preset(name: &str) -> Option<Link> {
    presets()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name))
}

/// Seconds to move `bytes`: latency + bytes / (bandwidth × payload share × efficiency).
pub fn transfer_time(link: &Link, bytes: u64, efficiency: f64) -> f64 {
    link.latency_s + bytes as f64 / (link.bytes_per_s * link.payload_share * efficiency)
}

/// The part of a transfer not hidden behind prefill when KV is streamed layer by layer:
/// layer `i` can leave once it is computed, so all but the last layer's share overlaps with
/// the remaining compute. Exposed = max(transfer / L, transfer − prefill × (L − 1) / L).
pub fn exposed_time(transfer_s: f64, prefill_s: f64, layers: u64) -> f64 {
    let l = layers.max(1) as f64;
    (transfer_s / l).max(transfer_s - prefill_s * (l - 1.0) / l)
}

/// Measures a real TCP copy over 127.0.0.1 of `bytes`, returns bytes per second.
pub fn measure_loopback(bytes: usize) -> std::io::Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))??;
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    Ok(got as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB256: u64 = 256 * 1024 * 1024;

    #[test]
    fn published_transfer_times() {
        let ideal = |gbps: f64| Link {
            name: "x".into(),
            bytes_per_s: gbps * 1e9,
            latency_s: 0.0,
            payload_share: 1.0,
        };
        // 256 MiB over 10 GbE (1.25 GB/s) ≈ 215 ms; over a 25 GB/s fabric ≈ 11 ms.
        assert_eq!(
            (transfer_time(&ideal(1.25), MIB256, 1.0) * 1e3).round(),
            215.0
        );
        assert_eq!(
            (transfer_time(&ideal(25.0), MIB256, 1.0) * 1e3).round(),
            11.0
        );
        let ten = preset("10GbE").expect("preset");
        assert!(transfer_time(&ten, MIB256, 0.5) > 0.429);
        // TCP over 10 GbE at MTU 1500: 1,448 payload bytes per 1,538 on the line.
        assert_eq!((transfer_time(&ten, MIB256, 1.0) * 1e3).round(), 228.0);
        assert_eq!((tcp_over_ethernet(9000.0) * 1e3).round(), 990.0);
    }

    #[test]
    fn overlap_hides_all_but_the_last_layer() {
        assert_eq!(exposed_time(0.32, 10.0, 32), 0.01);
        assert!((exposed_time(0.32, 0.0, 32) - 0.32).abs() < 1e-12);
        // 0.32 − 0.16 × 31/32 = 0.165
        assert!((exposed_time(0.32, 0.16, 32) - 0.165).abs() < 1e-12);
    }

    #[test]
    fn loopback_measures_a_positive_rate() {
        let r = measure_loopback(8 << 20).expect("loopback");
        assert!(r > 0.0);
    }
}
