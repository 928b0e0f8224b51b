//! Unit tests of `dma.rs` (the pool, size classes, and `DmaBuf`).

use super::*;

/// A private pool (leaked: chunks are never unmapped anyway) so counters are deterministic.
fn private_pool(try_hugepage: bool, max_chunks: usize) -> &'static Pool {
    Box::leak(Box::new(Pool::new(try_hugepage, max_chunks)))
}

fn fill_pattern(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

fn check_pattern(buf: &[u8], seed: u8) -> bool {
    buf.iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u8).wrapping_mul(31).wrapping_add(seed))
}

#[test]
fn alignment_and_capacity_for_many_sizes() {
    let sizes = [
        1,
        511,
        512,
        4095,
        4096,
        4097,
        8191,
        8192,
        12288,
        65536,
        65537,
        1 << 20,
        (1 << 20) + 1,
        DMA_CHUNK_SIZE - 1,
        DMA_CHUNK_SIZE,
        DMA_CHUNK_SIZE + 1,
        3 << 20,
    ];
    let mut keep = Vec::new();
    for &len in &sizes {
        let buf = DmaBuf::alloc(len).expect("alloc");
        assert_eq!(buf.as_ptr() as usize % DMA_ALIGN, 0, "len {len}");
        assert_eq!(buf.len(), len);
        assert!(!buf.is_empty());
        assert!(buf.capacity() >= len && buf.capacity().is_multiple_of(DMA_ALIGN));
        assert_eq!(
            buf.fixed_region().is_none(),
            len > DMA_CHUNK_SIZE,
            "len {len}"
        );
        keep.push(buf);
    }
    // Regions reported for pooled buffers really contain them.
    let regions = dma_regions();
    for buf in keep.iter().filter(|b| b.fixed_region().is_some()) {
        let r = regions[usize::from(buf.fixed_region().unwrap_or_default())];
        assert!(
            r.contains(buf.as_ptr(), buf.capacity()),
            "{buf:?} not in {r:?}"
        );
        assert_eq!(r.addr % DMA_CHUNK_SIZE, 0);
        assert_eq!(r.hugepage, buf.is_hugepage());
    }
}

#[test]
fn zero_length_is_rejected() {
    let err = DmaBuf::alloc(0).expect_err("len 0 must fail");
    assert_eq!(err.errno(), -libc::EINVAL);
    assert_eq!(
        DmaBuf::alloc(usize::MAX).expect_err("overflow").errno(),
        -libc::EINVAL
    );
}

#[test]
fn write_read_patterns_do_not_overlap() {
    let mut bufs: Vec<DmaBuf> = (0..64)
        .map(|i| DmaBuf::alloc(4096 * (1 + i % 5)).expect("alloc"))
        .collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        fill_pattern(b, i as u8);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(check_pattern(b, i as u8), "buffer {i} was clobbered");
    }
}

#[test]
fn alloc_zeroed_is_zero_after_reuse() {
    let pool = private_pool(false, 4);
    let mut a = pool.alloc(8192).expect("alloc");
    a.fill(0xa5);
    let p = a.as_ptr();
    drop(a);
    let b = pool.alloc_zeroed(8192).expect("alloc_zeroed");
    assert_eq!(b.as_ptr(), p, "freed block is reused");
    assert!(b.iter().all(|&x| x == 0));
    let z = DmaBuf::alloc_zeroed(3 * 4096 + 7).expect("alloc_zeroed");
    assert!(z.iter().all(|&x| x == 0));
}

#[test]
fn free_and_realloc_reuses_and_coalesces() {
    let pool = private_pool(false, 1);
    // Fill the whole chunk with 4 KiB buffers, free them all, then a 2 MiB one must fit:
    // only possible if buddies were merged back.
    let small: Vec<DmaBuf> = (0..512).map(|_| pool.alloc(4096).expect("alloc")).collect();
    assert_eq!(pool.stats().bytes_in_use, DMA_CHUNK_SIZE);
    assert_eq!(pool.alloc(4096).expect_err("full").errno(), -libc::ENOMEM);
    let first = small[0].as_ptr();
    drop(small);
    let st = pool.stats();
    assert_eq!((st.bytes_in_use, st.buffers_in_use, st.chunks), (0, 0, 1));
    let big = pool
        .alloc(DMA_CHUNK_SIZE)
        .expect("whole chunk after coalescing");
    assert_eq!(big.as_ptr(), first);
    drop(big);
    // Mixed sizes, freed in a shuffled order, coalesce as well.
    let mut v: Vec<DmaBuf> = [4096, 16384, 4096, 65536, 8192, 1 << 20, 4096]
        .iter()
        .map(|&l| pool.alloc(l).expect("alloc"))
        .collect();
    fastrand::seed(7);
    fastrand::shuffle(&mut v);
    drop(v);
    assert_eq!(pool.stats().bytes_in_use, 0);
    assert!(pool.alloc(DMA_CHUNK_SIZE).is_ok());
}

#[test]
fn pool_cap_returns_pool_exhausted() {
    let pool = private_pool(false, 2);
    let a = pool.alloc(DMA_CHUNK_SIZE).expect("chunk 0");
    let b = pool.alloc(DMA_CHUNK_SIZE).expect("chunk 1");
    let err = pool.alloc(4096).expect_err("cap");
    assert!(matches!(err, DmaError::PoolExhausted { max_chunks: 2 }));
    assert_eq!(err.errno(), -libc::ENOMEM);
    assert_eq!(a.fixed_region(), Some(0));
    assert_eq!(b.fixed_region(), Some(1));
    // Oversized buffers are not limited by the chunk cap.
    assert!(pool.alloc(DMA_CHUNK_SIZE + 1).is_ok());
}

#[test]
fn oversized_buffers_have_own_mapping() {
    let pool = private_pool(false, 1);
    let len = 5 * DMA_CHUNK_SIZE / 2 + 100;
    let mut big = pool.alloc(len).expect("oversized");
    assert_eq!(big.fixed_region(), None);
    assert!(!big.is_hugepage());
    assert_eq!(big.capacity(), round_up(len, 4096).unwrap_or_default());
    assert_eq!(big.as_ptr() as usize % DMA_ALIGN, 0);
    fill_pattern(&mut big, 3);
    assert!(check_pattern(&big, 3));
    let st = pool.stats();
    assert_eq!(
        (st.oversized_buffers, st.oversized_bytes, st.chunks),
        (1, big.capacity(), 0)
    );
    drop(big);
    let st = pool.stats();
    assert_eq!((st.oversized_buffers, st.oversized_bytes), (0, 0));
}

#[test]
fn fallback_path_without_hugepages() {
    let (base, huge) = map_chunk(false).expect("plain chunk");
    assert!(!huge);
    assert_eq!(base % DMA_CHUNK_SIZE, 0);
    let pool = private_pool(false, 2);
    let mut b = pool.alloc(4096).expect("alloc");
    assert!(!b.is_hugepage());
    fill_pattern(&mut b, 9);
    assert!(check_pattern(&b, 9));
    let st = pool.stats();
    assert_eq!((st.chunks, st.hugepage_chunks), (1, 0));
    assert_eq!(pool.regions()[0].addr % DMA_CHUNK_SIZE, 0);
}

#[test]
fn hugepage_path_works_or_falls_back() {
    // Whether the machine has free 2 MiB pages right now is outside our control; either
    // outcome must give a usable, 2 MiB-aligned chunk.
    let (base, huge) = map_chunk(true).expect("chunk");
    assert_eq!(base % DMA_CHUNK_SIZE, 0);
    let pool = private_pool(true, 2);
    let mut b = pool.alloc(DMA_CHUNK_SIZE).expect("alloc");
    fill_pattern(&mut b, 1);
    assert!(check_pattern(&b, 1));
    let st = pool.stats();
    assert_eq!(st.hugepage_chunks, usize::from(b.is_hugepage()));
    eprintln!(
        "hugepage chunk available: {huge}, pool chunk hugepage: {}",
        b.is_hugepage()
    );
}

#[test]
fn allocating_across_threads() {
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..200usize {
                    let mut b = DmaBuf::alloc(4096 << (i % 4)).expect("alloc");
                    fill_pattern(&mut b, t);
                    mine.push(b);
                    if i % 3 == 0 {
                        mine.swap_remove(i % mine.len());
                    }
                }
                mine
            })
        })
        .collect();
    let results: Vec<Vec<DmaBuf>> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    for (t, bufs) in results.iter().enumerate() {
        assert!(bufs.iter().all(|b| check_pattern(b, t as u8)));
    }
    // Buffers are Send: drop them on yet another thread.
    std::thread::spawn(move || drop(results))
        .join()
        .expect("drop thread");
}

#[test]
fn stats_track_usage() {
    let pool = private_pool(false, 8);
    assert_eq!(pool.stats(), DmaPoolStats::default());
    let a = pool.alloc(100).expect("alloc");
    let b = pool.alloc(5000).expect("alloc");
    let c = pool.alloc(DMA_CHUNK_SIZE).expect("alloc");
    let st = pool.stats();
    assert_eq!(st.chunks, 2);
    assert_eq!(st.buffers_in_use, 3);
    assert_eq!(st.bytes_in_use, 4096 + 8192 + DMA_CHUNK_SIZE);
    assert_eq!(st.bytes_free, 2 * DMA_CHUNK_SIZE - st.bytes_in_use);
    assert_eq!(pool.regions().len(), 2);
    drop((a, b, c));
    let st = pool.stats();
    assert_eq!((st.buffers_in_use, st.bytes_in_use, st.chunks), (0, 0, 2));
    // The global pool's stats are consistent too (other tests run concurrently).
    let g = dma_pool_stats();
    assert!(g.hugepage_chunks <= g.chunks && g.bytes_in_use <= g.chunks * DMA_CHUNK_SIZE);
}
