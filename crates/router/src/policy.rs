//! Which instance of a pool gets a request. A policy orders the pool's available instances,
//! best first; the proxy sends to the first and, if it cannot be reached, retries the next.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What the router knows of an instance when it chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// From the last `/health` poll (`None`: not polled successfully yet).
    pub free_blocks: Option<u64>,
    /// The instance's KV pool, from the same poll.
    pub total_blocks: u64,
    pub running: u64,
    pub waiting: u64,
    /// Requests this router has sent and not yet seen answered.
    pub in_flight: u64,
    /// The KV blocks those requests will take, by [`Ask::blocks`].
    pub in_flight_blocks: u64,

    /// Which instance (stable while it is a member), for policies that remember.
    pub id: u64,
}

impl Load {
    /// Queue depth: what the instance runs and waits on, and what is on its way to it.
    pub fn queue(&self) -> u64 {
        self.running + self.waiting + self.in_flight
    }
}

/// A request as a policy sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask<'a> {
    /// KV blocks the request will take (prompt and output), if known.
    pub blocks: u64,
    /// The prompt's beginning (text, or token ids as JSON), for prefix affinity.
    pub head: &'a [u8],
}

pub trait Policy: Send + Sync {
    fn name(&self) -> &'static str;
    /// Indices into `loads`, best first; every index once.
    fn order(&self, loads: &[Load], ask: &Ask<'_>) -> Vec<usize>;
}

/// FNV-1a, continued from `h` (start at [`FNV_OFFSET`]): a fixed hash, the same in every
/// process and after restarts.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The policy a `--prefill-policy` / `--decode-policy` value names.
pub fn by_name(name: &str) -> Result<Box<dyn Policy>, String> {
    Ok(match name {
        "round_robin" => Box::new(RoundRobin::default()),
        "random" => Box::new(Random::default()),
        "least_load" => Box::new(LeastLoad),
        "power_of_two" => Box::new(PowerOfTwo::default()),
        "free_blocks" => Box::new(FreeBlocks),
        "cache_aware" => Box::new(CacheAware::default()),
        other => {
            return Err(format!(
                "unknown policy {other:?}; one of round_robin, random, least_load, power_of_two, free_blocks, cache_aware"
            ))
        }
    })
}

/// Each in turn.
#[derive(Default)]
pub struct RoundRobin(AtomicUsize);

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round_robin"
    }
    fn order(&self, loads: &[Load], _: &Ask<'_>) -> Vec<usize> {
        let n = loads.len().max(1);
        let start = self.0.fetch_add(1, Ordering::Relaxed) % n;
        (0..loads.len()).map(|k| (start + k) % n).collect()
    }
}

/// A small generator for the random policies (no cryptographic use).
#[derive(Default)]
struct Rng(AtomicU64);

impl Rng {
    fn next(&self) -> u64 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let mut x = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) ^ seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Uniformly at random.
#[derive(Default)]
pub struct Random(Rng);

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn order(&self, loads: &[Load], _: &Ask<'_>) -> Vec<usize> {
        let mut v: Vec<usize> = (0..loads.len()).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, (self.0.next() % (i as u64 + 1)) as usize);
        }
        v
    }
}

/// Shortest queue (running + waiting + in flight); ties to the lower index.
pub struct LeastLoad;

fn by_queue(loads: &[Load]) -> Vec<usize> {
    let mut v: Vec<usize> = (0..loads.len()).collect();
    v.sort_by_key(|&i| (loads[i].queue(), i));
    v
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }
    fn order(&self, loads: &[Load], _: &Ask<'_>) -> Vec<usize> {
        by_queue(loads)
    }
}

/// Two at random, the shorter queue of them first; then the rest by queue.
#[derive(Default)]
pub struct PowerOfTwo(Rng);

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power_of_two"
    }
    fn order(&self, loads: &[Load], _: &Ask<'_>) -> Vec<usize> {
        let n = loads.len();
        if n < 2 {
            return (0..n).collect();
        }
        let a = (self.0.next() % n as u64) as usize;
        let b = (a + 1 + (self.0.next() % (n as u64 - 1)) as usize) % n;
        let first = if (loads[b].queue(), b) < (loads[a].queue(), a) {
            b
        } else {
            a
        };
        let mut v = vec![first];
        v.extend(by_queue(loads).into_iter().filter(|&i| i != first));
        v
    }
}

/// Most free KV blocks once this request and every one in flight to the instance hold
/// their full need (prompt and `max_tokens`): the pool less those needs, or the polled free
/// blocks where they are fewer (blocks taken by others); an instance not polled yet comes
/// last. The capacity signal of a decode pool. A request's blocks grow as it decodes, so
/// neither the blocks free now (new work piles onto the instance whose requests just
/// started) nor free-now less full needs (it shuns the instance about to free its blocks)
/// predicts where room will be; the full needs do.
pub struct FreeBlocks;

fn headroom(l: &Load, ask: &Ask<'_>) -> i64 {
    match l.free_blocks {
        // An instance that does not report its pool: the free blocks less the needs.
        Some(f) if l.total_blocks == 0 => f as i64 - l.in_flight_blocks as i64 - ask.blocks as i64,
        Some(f) => {
            let projected = l.total_blocks as i64 - l.in_flight_blocks as i64;
            projected.min(f as i64) - ask.blocks as i64
        }
        None => i64::MIN,
    }
}

impl Policy for FreeBlocks {
    fn name(&self) -> &'static str {
        "free_blocks"
    }
    fn order(&self, loads: &[Load], ask: &Ask<'_>) -> Vec<usize> {
        let mut v: Vec<usize> = (0..loads.len()).collect();
        v.sort_by_key(|&i| (std::cmp::Reverse(headroom(&loads[i], ask)), i));
        v
    }
}

/// Prefix affinity, SGLang-style over chunks of the prompt: its beginning is cut into
/// [`CacheAware::CHUNK`]-byte chunks, each hashed together with all before it (FNV-1a,
/// chained); the router remembers, for recent chunk hashes, the instance that last got a
/// prompt through them. A prompt goes to the instance holding its longest remembered run
/// (where its prefix is most likely cached), unless that instance's queue is longer than the
/// shortest by more than [`CacheAware::BALANCE`]; then, and for a prompt nothing matches,
/// the shortest queue wins.
#[derive(Default)]
pub struct CacheAware {
    seen: std::sync::Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    map: std::collections::HashMap<u64, (u64, u64)>,
    tick: u64,
}

impl CacheAware {
    pub const CHUNK: usize = 64;
    /// Chunks considered (the first 4 KiB of a prompt).
    pub const MAX_CHUNKS: usize = 64;
    pub const BALANCE: u64 = 8;
    /// Chunk hashes remembered at most (the oldest half is forgotten past it).
    pub const CAPACITY: usize = 1 << 16;

    fn chunks(head: &[u8]) -> Vec<u64> {
        let mut h = FNV_OFFSET;
        head.chunks(Self::CHUNK)
            .take(Self::MAX_CHUNKS)
            .filter(|c| c.len() == Self::CHUNK)
            .map(|c| {
                h = fnv1a(h, c);
                h
            })
            .collect()
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache_aware"
    }
    fn order(&self, loads: &[Load], ask: &Ask<'_>) -> Vec<usize> {
        let queue = by_queue(loads);
        if loads.is_empty() {
            return queue;
        }
        let chunks = Self::chunks(ask.head);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        // The longest remembered run whose instance is still a candidate.
        let home = chunks.iter().rev().find_map(|h| {
            let (id, _) = seen.map.get(h)?;
            loads.iter().position(|l| l.id == *id)
        });
        let shortest = loads[queue[0]].queue();
        let first = match home {
            Some(h) if loads[h].queue() <= shortest + Self::BALANCE => h,
            _ => queue[0],
        };
        let id = loads[first].id;
        for h in chunks {
            seen.tick += 1;
            let t = seen.tick;
            seen.map.insert(h, (id, t));
        }
        if seen.map.len() > Self::CAPACITY {
            let keep_from = seen.tick.saturating_sub(Self::CAPACITY as u64 / 2);
            seen.map.retain(|_, (_, t)| *t > keep_from);
        }
        let mut v = vec![first];
        v.extend(queue.into_iter().filter(|&i| i != first));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(free: Option<u64>, running: u64, waiting: u64, in_flight: u64) -> Load {
        Load {
            free_blocks: free,
            running,
            waiting,
            in_flight,
            ..Load::default()
        }
    }

    fn is_permutation(v: &[usize], n: usize) -> bool {
        let mut s = v.to_vec();
        s.sort_unstable();
        s == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn round_robin_turns_and_random_covers() {
        let p = RoundRobin::default();
        let l = [Load::default(); 3];
        let firsts: Vec<usize> = (0..6).map(|_| p.order(&l, &Ask::default())[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.order(&l, &Ask::default()), [0, 1, 2]);
        let r = Random::default();
        let mut seen = [false; 3];
        for _ in 0..200 {
            let o = r.order(&l, &Ask::default());
            assert!(is_permutation(&o, 3));
            seen[o[0]] = true;
        }
        assert_eq!(seen, [true; 3]);
        assert!(r.order(&[], &Ask::default()).is_empty());
    }

    #[test]
    fn least_load_counts_running_waiting_and_in_flight() {
        let l = [
            load(None, 2, 0, 0),
            load(None, 0, 1, 1),
            load(None, 1, 0, 0),
        ];
        assert_eq!(LeastLoad.order(&l, &Ask::default()), [2, 0, 1]);
        // A tie goes to the lower index.
        let l = [load(None, 1, 0, 0), load(None, 0, 0, 1)];
        assert_eq!(LeastLoad.order(&l, &Ask::default()), [0, 1]);
    }

    #[test]
    fn power_of_two_never_picks_the_longest_of_its_pair() {
        let p = PowerOfTwo::default();
        let l = [load(None, 5, 0, 0), load(None, 0, 0, 0)];
        for _ in 0..50 {
            assert_eq!(p.order(&l, &Ask::default()), [1, 0]);
        }
        let l = [
            load(None, 9, 0, 0),
            load(None, 1, 0, 0),
            load(None, 2, 0, 0),
        ];
        for _ in 0..200 {
            let o = p.order(&l, &Ask::default());
            assert!(is_permutation(&o, 3));
            assert_ne!(o[0], 0, "the longest queue loses to either other");
        }
        assert_eq!(p.order(&l[..1], &Ask::default()), [0]);
    }

    #[test]
    fn free_blocks_counts_this_request_and_the_full_needs_of_those_in_flight() {
        let ask = Ask {
            blocks: 10,
            head: b"",
        };
        let l = |free, total, in_flight_blocks| Load {
            free_blocks: Some(free),
            total_blocks: total,
            in_flight_blocks,
            ..Load::default()
        };
        // A pool of 100 with 40 blocks of needs in flight: 50 after this one, however much
        // of those 40 the requests already hold; against 80 of 100 free with none: 70.
        assert_eq!(
            FreeBlocks.order(&[l(90, 100, 40), l(80, 100, 0)], &ask),
            [1, 0]
        );
        assert_eq!(
            FreeBlocks.order(&[l(60, 100, 40), l(80, 100, 0)], &ask),
            [1, 0]
        );
        // At 20 blocks in flight they tie at 70: the lower index.
        assert_eq!(
            FreeBlocks.order(&[l(95, 100, 20), l(80, 100, 0)], &ask),
            [0, 1]
        );
        assert_eq!(
            FreeBlocks.order(&[l(95, 100, 21), l(80, 100, 0)], &ask),
            [1, 0]
        );
        // Fewer free than the needs leave (blocks taken by other clients): the free ones.
        assert_eq!(
            FreeBlocks.order(&[l(75, 100, 0), l(80, 100, 0)], &ask),
            [1, 0]
        );
        // No pool size reported: free blocks less the needs (70 against 80 - 20 - 10).
        assert_eq!(
            FreeBlocks.order(&[l(80, 0, 20), l(80, 100, 0)], &ask),
            [1, 0]
        );
        assert_eq!(
            FreeBlocks.order(&[l(100, 0, 20), l(80, 100, 10)], &ask),
            [0, 1]
        );
        // Not polled yet: last.
        let unpolled = Load::default();
        assert_eq!(FreeBlocks.order(&[unpolled, l(1, 1, 0)], &ask), [1, 0]);
    }

    #[test]
    fn cache_aware_follows_the_longest_remembered_prefix_until_the_balance_breaks() {
        let p = CacheAware::default();
        let mut l = [Load::default(); 3];
        for (i, x) in l.iter_mut().enumerate() {
            x.id = 100 + i as u64;
        }
        let sys = vec![b's'; 256];
        let prompt = |tail: &[u8]| [&sys[..], tail].concat();
        fn ask(h: &[u8]) -> Ask<'_> {
            Ask { blocks: 1, head: h }
        }
        // The first prompt with this head lands on the shortest queue; later ones follow it.
        l[0].running = 1;
        let a = prompt(&[b'a'; 64]);
        let home = p.order(&l, &ask(&a))[0];
        assert_eq!(home, 1);
        l[1].running = 3;
        let b = prompt(&[b'b'; 64]);
        assert_eq!(p.order(&l, &ask(&b))[0], home, "same head, other question");
        // A prompt nothing matches: the shortest queue.
        assert_eq!(p.order(&l, &ask(&[b'z'; 256]))[0], 2);
        // The longest run wins: after `a` went to 0 once (by balance), `a` follows 0, and a
        // prompt that shares only the head goes where the head was last seen.
        l[2].running = 5;
        l[1].running = 1 + CacheAware::BALANCE + 1;
        assert_eq!(p.order(&l, &ask(&a))[0], 0, "balance broken: the shortest");
        l[1].running = 0;
        assert_eq!(p.order(&l, &ask(&a))[0], 0, "its longest run is on 0 now");
        // Under a chunk: no affinity.
        assert!(CacheAware::chunks(b"short").is_empty());
        // Memory stays bounded.
        for k in 0..(CacheAware::CAPACITY / 16) as u32 {
            let h: Vec<u8> = (0..CacheAware::CHUNK * 40)
                .map(|i| (k.wrapping_mul(7919) ^ i as u32) as u8)
                .collect();
            p.order(&l, &ask(&h));
        }
        assert!(p.seen.lock().unwrap().map.len() <= CacheAware::CAPACITY);
    }

    #[test]
    fn names_round_trip() {
        for n in [
            "round_robin",
            "random",
            "least_load",
            "power_of_two",
            "free_blocks",
            "cache_aware",
        ] {
            assert_eq!(by_name(n).map(|p| p.name()), Ok(n));
        }
        assert!(by_name("fastest").is_err());
    }
}
