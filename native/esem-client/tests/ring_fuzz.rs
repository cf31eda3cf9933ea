//! The client's switchless ring access against an adversary that writes the shared
//! region (PROTOCOL.md 15.2), on a real shared mapping: at least `ESEM_FUZZ_CASES`
//! (default 100,000) random sequences of hostile counter values (arbitrary u64s, and
//! values on either side of every bound), hostile data and honest client reads and
//! writes, each checked against a model: a read returns exactly the ring's bytes
//! between our private tail and a head at most `capacity` ahead (else a protocol
//! error, and nothing moves), a write lands exactly at our private head within the
//! room a tail at most `capacity` behind allows (else an error), no header word but
//! the one we own changes, and nothing panics. Deterministic (seeded xorshift): a
//! failure prints the case's seed.

use esem_client::ring::{Rings, Shm};
use esem_proto::ring::{
    offset, region_size, reply_area, request_area, HEADER_BYTES, MIN_RING_BYTES,
    RING_LAYOUT_VERSION, RING_MAGIC,
};
use esem_proto::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// A counter value relative to `base`: anywhere, or just around the bounds.
    fn counter(&mut self, base: u64, cap: u64) -> u64 {
        match self.below(6) {
            0 => self.next(),
            // Mostly frame-sized distances (the case stays fast), sometimes any.
            1 => {
                let span = if self.below(8) == 0 { cap + 1 } else { 512 };
                base.wrapping_add(self.below(span))
            }
            2 => base.wrapping_add(cap + 1 + self.below(4)),
            3 => base.wrapping_sub(1 + self.below(4)),
            4 => base.wrapping_add(cap).wrapping_sub(self.below(3)),
            _ => base,
        }
    }
}

fn cases() -> u64 {
    std::env::var("ESEM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// A region as the service lays it out, with counters preset to `start`.
fn region(cap: u64, start: u64) -> Shm {
    let shm = Shm::anonymous(region_size(cap).unwrap()).unwrap();
    shm.store(offset::MAGIC, RING_MAGIC);
    shm.store(offset::VERSION, RING_LAYOUT_VERSION);
    shm.store(offset::CAPACITY, cap);
    for off in [
        offset::REQ_HEAD,
        offset::REQ_TAIL,
        offset::REP_HEAD,
        offset::REP_TAIL,
    ] {
        shm.store(off, start);
    }
    shm
}

/// The header's words up to the last counter's cache line (the rest of the page is
/// never read or written by anyone).
fn header(shm: &Shm) -> Vec<u64> {
    (0..(offset::REQ_DONE + 64) / 8)
        .map(|i| shm.load(i * 8))
        .collect()
}

fn byte_at(shm: &Shm, area: usize, cap: u64, counter: u64) -> u8 {
    let mut b = [0u8];
    assert!(shm.read_at(area + (counter & (cap - 1)) as usize, &mut b));
    b[0]
}

/// One random case on a fresh region; panics (with what went wrong) on a violation.
fn run_case(rng: &mut Rng) {
    let cap = MIN_RING_BYTES << rng.below(2);
    let start = match rng.below(3) {
        0 => 0,
        1 => u64::MAX - rng.below(2 * cap), // the free-running counters wrap mid-case
        _ => rng.next(),
    };
    let mut rings = Rings::attach_at(region(cap, start), cap, start).unwrap();
    let (req, rep) = (request_area(cap), reply_area(cap));
    // Our private counters, as the model keeps them.
    let (mut head, mut tail) = (start, start);
    for _ in 0..1 + rng.below(6) {
        let shm = rings.shm();
        match rng.below(5) {
            0 => shm.store(offset::REP_HEAD, rng.counter(tail, cap)),
            1 => shm.store(offset::REQ_TAIL, rng.counter(head, cap).wrapping_sub(cap)),
            2 => {
                // Hostile (or honest) bytes anywhere in the data areas.
                let at = HEADER_BYTES + rng.below(2 * cap) as usize;
                let n = (rng.below(300) as usize).min(HEADER_BYTES + 2 * cap as usize - at);
                let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                assert!(shm.write_at(at, &data));
            }
            3 => {
                let limit = match rng.below(3) {
                    0 => usize::MAX,
                    1 => rng.below(2 * cap) as usize,
                    _ => rng.below(100) as usize,
                };
                let shared_head = shm.load(offset::REP_HEAD);
                let ready = shared_head.wrapping_sub(tail);
                let before = header(shm);
                let expect: Option<Vec<u8>> = (ready <= cap).then(|| {
                    let k = ready.min(limit as u64);
                    (0..k)
                        .map(|i| byte_at(shm, rep, cap, tail.wrapping_add(i)))
                        .collect()
                });
                match (rings.read(limit), expect) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "read the wrong bytes");
                        tail = tail.wrapping_add(got.len() as u64);
                        let shm = rings.shm();
                        if !got.is_empty() {
                            assert_eq!(shm.load(offset::REP_TAIL), tail, "tail not published");
                        }
                        let mut after = header(shm);
                        after[offset::REP_TAIL / 8] = before[offset::REP_TAIL / 8];
                        assert_eq!(after, before, "a read changed another header word");
                    }
                    (Err(Error::Protocol(_)), None) => {
                        assert_eq!(header(rings.shm()), before, "a refused read moved");
                    }
                    (got, want) => panic!(
                        "head {shared_head} tail {tail} cap {cap}: got {:?}, expected {:?}",
                        got.map(|v| v.len()),
                        want.map(|v| v.len())
                    ),
                }
            }
            _ => {
                let n = if rng.below(16) == 0 {
                    rng.below(cap + cap / 2)
                } else {
                    rng.below(600)
                } as usize;
                let data: Vec<u8> = (0..n).map(|i| (i as u8) ^ (rng.next() as u8)).collect();
                let shared_tail = shm.load(offset::REQ_TAIL);
                let used = head.wrapping_sub(shared_tail);
                let before = header(shm);
                let edge = |s: &Shm, c: u64| byte_at(s, req, cap, c);
                let (pre, post) = (edge(shm, head.wrapping_sub(1)), edge(shm, head));
                match rings.write(&data) {
                    Ok(k) => {
                        assert!(used <= cap, "wrote with a tail {used} behind (cap {cap})");
                        assert_eq!(k as u64, (n as u64).min(cap - used), "wrong amount");
                        let shm = rings.shm();
                        for (i, b) in data[..k].iter().enumerate() {
                            assert_eq!(edge(shm, head.wrapping_add(i as u64)), *b);
                        }
                        if k < cap as usize {
                            // The byte before our head, and after what we wrote, untouched
                            // (unless the write wrapped onto them).
                            if used + (k as u64) < cap {
                                assert_eq!(edge(shm, head.wrapping_sub(1)), pre);
                            }
                            if k == 0 {
                                assert_eq!(edge(shm, head), post);
                            }
                        }
                        head = head.wrapping_add(k as u64);
                        let mut after = header(shm);
                        if k > 0 {
                            assert_eq!(after[offset::REQ_HEAD / 8], head, "head not published");
                        }
                        after[offset::REQ_HEAD / 8] = before[offset::REQ_HEAD / 8];
                        assert_eq!(after, before, "a write changed another header word");
                    }
                    Err(Error::Protocol(_)) => {
                        assert!(
                            used > cap,
                            "refused a valid tail ({used} behind, cap {cap})"
                        );
                        assert_eq!(header(rings.shm()), before, "a refused write moved");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
        // The hints never fail, whatever the region says.
        let _ = (rings.peer_sleeping(), rings.all_done(), rings.unconsumed());
    }
}

#[test]
fn hostile_region_never_breaks_the_ring_rules() {
    let n = cases();
    assert!(n > 0);
    let mut rng = Rng(0x005e_ed0f_e5e4_0001);
    for case in 0..n {
        let seed = rng.next() | 1;
        let mut case_rng = Rng(seed);
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| run_case(&mut case_rng))) {
            panic!("case {case} (seed {seed:#x}) failed: {e:?}");
        }
    }
}

#[test]
fn header_and_size_are_checked() {
    let cap = MIN_RING_BYTES;
    assert!(Rings::attach(region(cap, 0), cap).is_ok());
    // The authenticated capacity must be the header's and the mapping's.
    assert!(Rings::attach(region(cap, 0), cap * 2).is_err());
    let wrong_magic = region(cap, 0);
    wrong_magic.store(offset::MAGIC, 0);
    assert!(Rings::attach(wrong_magic, cap).is_err());
    let wrong_version = region(cap, 0);
    wrong_version.store(offset::VERSION, 2);
    assert!(Rings::attach(wrong_version, cap).is_err());
    let small = Shm::anonymous(region_size(cap).unwrap() - 4096).unwrap();
    assert!(Rings::attach(small, cap).is_err());
    assert!(Rings::attach(region(cap, 0), cap + 1).is_err());
}

#[test]
fn shm_accessors_refuse_out_of_range() {
    let shm = Shm::anonymous(8192).unwrap();
    assert!(!shm.write_at(8190, &[1, 2, 3]));
    assert!(!shm.write_at(usize::MAX, &[1]));
    let mut b = [0u8; 4];
    assert!(!shm.read_at(8189, &mut b));
    assert!(shm.read_at(8188, &mut b));
    assert_eq!(shm.load(8192), 0); // outside: reads nothing
    assert_eq!(shm.load(3), 0); // misaligned: reads nothing
    shm.store(8192, 7); // outside: writes nothing (and does not fault)
    shm.store(8, 7);
    assert_eq!(shm.load(8), 7);
}
