//! A short, deterministic run of the fuzz targets (`splitserve_kv::fuzz`) in every test
//! run: seeds of each format, their mutations and random bytes. Besides no panic, no single
//! allocation may exceed what the input implies (a header announcing 256 MiB must not cost
//! 256 MiB). `cargo fuzz` runs the same targets coverage-guided (see `fuzz/`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use splitserve_kv::fuzz;
use splitserve_kv::wire::Frame;

struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let hello = serde_json::json!({"nonce": "00".repeat(16)});
    let mut handshake = Frame::Hello(serde_json::to_vec(&hello).unwrap()).encode();
    handshake.extend(Frame::Auth(vec![0; 32]).encode());
    let fingerprint = serde_json::json!({"fingerprint": {"format_version": 1,
        "model_sha256": "0", "architecture": "llama", "n_layer": 30, "n_kv_head": 3,
        "head_dim": 64, "kv_dtype": "f16", "block_size": 16}});
    handshake.extend(Frame::Hello(serde_json::to_vec(&fingerprint).unwrap()).encode());
    vec![
        handshake,
        Frame::Pull {
            request_id: "cmpl-1-0".into(),
            capability: "ab".repeat(16),
            from_block: 2,
        }
        .encode(),
        Frame::Release {
            request_id: "r".into(),
            capability: "c".into(),
        }
        .encode(),
        Frame::Layer {
            layer: 0,
            blocks: 1,
            data: vec![1; 40],
        }
        .encode(),
        br#"{"remote_host":"127.0.0.1","remote_port":5600,"remote_request_id":"x","remote_capability":"00","remote_expires_at":99999999999,"kv_signature":"00"}"#.to_vec(),
        b"SSMG\x01\x00\x10\x00\x00\x00{\"fingerprint\":1}\x01\x00\x00\x00".to_vec(),
    ]
}

fn mutate(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(5) {
            0 if !b.is_empty() => {
                let i = r.below(b.len());
                b[i] = r.next() as u8;
            }
            1 if !b.is_empty() => {
                // A length field set large: the case that must not allocate.
                let i = r.below(b.len());
                for (k, x) in [0xff, 0xff, 0xff, 0x0f].iter().enumerate() {
                    if let Some(y) = b.get_mut(i + k) {
                        *y = *x;
                    }
                }
            }
            2 => b.truncate(r.below(b.len() + 1)),
            3 => b.extend((0..r.below(16)).map(|_| r.next() as u8)),
            _ => {
                let i = r.below(b.len() + 1);
                b.insert(i.min(b.len()), r.next() as u8);
            }
        }
    }
    b
}

type Target = (&'static str, fn(&[u8]));

#[test]
fn fuzz_targets_survive_mutated_and_random_input() {
    let targets: [Target; 4] = [
        ("wire", fuzz::wire),
        ("handshake", fuzz::handshake),
        ("transfer_params", fuzz::transfer_params),
        ("migration", fuzz::migration),
    ];
    let seeds = seeds();
    let mut r = Rng(0x5eed_cafe_f00d_d00d);
    let mut runs = 0;
    for _ in 0..20000 {
        let input = if r.below(4) == 0 {
            (0..r.below(200)).map(|_| r.next() as u8).collect()
        } else {
            let i = r.below(seeds.len());
            mutate(&mut r, &seeds[i])
        };
        for (name, f) in targets {
            LARGEST.store(0, Ordering::Relaxed);
            f(&input);
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(
                largest <= (128 << 10) + 8 * input.len(),
                "{name}: an allocation of {largest} bytes for {} input bytes: {input:02x?}",
                input.len()
            );
            runs += 1;
        }
    }
    println!("{runs} runs of {} targets", targets.len());
}
