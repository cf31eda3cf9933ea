//! The switchless ring index rules of PROTOCOL.md 15.2.

use esem_proto::ring::*;
use esem_proto::Error;

#[test]
fn capacity_checks() {
    assert!(check_capacity(DEFAULT_RING_BYTES).is_ok());
    for bad in [
        0,
        1,
        MIN_RING_BYTES / 2,
        MIN_RING_BYTES + 1,
        MAX_RING_BYTES * 2,
        u64::MAX,
    ] {
        assert!(
            matches!(check_capacity(bad), Err(Error::Protocol(_))),
            "{bad}"
        );
    }
    assert_eq!(region_size(MIN_RING_BYTES).unwrap(), 4096 + 2 * 32768);
    assert_eq!(RING_MAGIC.to_le_bytes(), *b"esemring");
    assert!(check_header(RING_MAGIC, 1, 65536, 65536).is_ok());
    assert!(check_header(RING_MAGIC, 2, 65536, 65536).is_err());
    assert!(check_header(RING_MAGIC, 1, 32768, 65536).is_err());
}

#[test]
fn producer_and_consumer_agree_across_the_wrap() {
    let cap = MIN_RING_BYTES;
    let start = u64::MAX - 100; // counters wrap mod 2^64 mid-test
    let mut p = ProducerIndex::new(cap, start).unwrap();
    let mut c = ConsumerIndex::new(cap, start).unwrap();
    let mut ring = vec![0u8; cap as usize];
    let mut written = Vec::new();
    let mut read = Vec::new();
    let mut tail = c.tail();
    for round in 0..200u32 {
        let chunk: Vec<u8> = (0..(round * 997 % 20000))
            .map(|i| (i ^ round) as u8)
            .collect();
        let spans = p.plan_write(tail, chunk.len()).unwrap();
        let n = spans.len();
        ring[spans.first.0..spans.first.0 + spans.first.1].copy_from_slice(&chunk[..spans.first.1]);
        ring[..spans.second.1].copy_from_slice(&chunk[spans.first.1..n]);
        written.extend_from_slice(&chunk[..n]);
        let head = p.commit(&spans);
        let r = c.plan_read(head, 7000).unwrap();
        read.extend_from_slice(&ring[r.first.0..r.first.0 + r.first.1]);
        read.extend_from_slice(&ring[..r.second.1]);
        tail = c.commit(&r);
    }
    let r = c.plan_read(p.head(), usize::MAX).unwrap();
    read.extend_from_slice(&ring[r.first.0..r.first.0 + r.first.1]);
    read.extend_from_slice(&ring[..r.second.1]);
    assert_eq!(read, written);
}

#[test]
fn untrusted_indices_refused() {
    let cap = MIN_RING_BYTES;
    let h = 1_000_000u64;
    let p = ProducerIndex::new(cap, h).unwrap();
    // A tail ahead of our head, or more than cap behind it.
    assert!(p.used(h + 1).is_err());
    assert!(p.used(h - cap - 1).is_err());
    assert_eq!(p.used(h - cap).unwrap(), cap);
    assert_eq!(p.plan_write(h - cap, 10).unwrap().len(), 0);
    // Near zero the arithmetic is mod 2^64, as in the region.
    let p0 = ProducerIndex::new(cap, 3).unwrap();
    assert_eq!(p0.used(3u64.wrapping_sub(cap)).unwrap(), cap);
    let c = ConsumerIndex::new(cap, 5).unwrap();
    // A head more than cap ahead of our tail, or behind it.
    assert!(c.available(5 + cap + 1).is_err());
    assert!(c.available(4).is_err());
    assert_eq!(c.available(5 + cap).unwrap(), cap);
}
