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
    let (base, huge) = map_chunk(None).expect("plain chunk");
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
    let (base, huge) = map_chunk(Some(&HugepageAttempt::HUGETLB)).expect("chunk");
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

/// How often the injected populate step ran (tests of the hugepage fallback).
static POPULATE_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn populate_fails(_base: usize, _len: usize) -> std::io::Result<()> {
    POPULATE_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
}

#[test]
fn a_hugepage_chunk_that_cannot_be_populated_falls_back_to_ordinary_pages() {
    // An ordinary 2 MiB mapping stands in for the hugetlb one (this machine may have no
    // hugepages), and the populate step fails as it does under a hugetlb cgroup limit. The
    // chunk must not be reported as hugepage memory (the old code, relying on MAP_POPULATE,
    // had no step that could fail: it reported the chunk as a hugepage and the first write
    // raised SIGBUS).
    let attempt = HugepageAttempt {
        map_flags: 0,
        populate: populate_fails,
    };
    let pool: &'static Pool = Box::leak(Box::new(Pool::with_attempt(Some(attempt), 4)));
    let mut bufs = Vec::new();
    // Each chunk tries the hugepage path again; the kernel aligns 2 MiB anonymous mappings to
    // 2 MiB (THP alignment), so the stand-in reaches the populate step.
    for seed in 0..4u8 {
        let mut b = pool.alloc(DMA_CHUNK_SIZE).expect("alloc falls back");
        assert!(
            !b.is_hugepage(),
            "a chunk that failed to populate is not a hugepage"
        );
        fill_pattern(&mut b, seed);
        assert!(check_pattern(&b, seed));
        bufs.push(b);
    }
    assert!(
        POPULATE_CALLS.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the populate step ran (and failed) for at least one chunk"
    );
    let st = pool.stats();
    assert_eq!((st.chunks, st.hugepage_chunks), (4, 0));
    assert!(pool
        .regions()
        .iter()
        .all(|r| r.addr % DMA_CHUNK_SIZE == 0 && !r.hugepage));
}

#[test]
fn a_populated_stand_in_chunk_counts_as_hugepage() {
    // The control for the test above: the same stand-in with a populate step that succeeds is
    // kept as the hugepage chunk (so the fallback above is caused by the failed populate).
    fn populate_ok(base: usize, len: usize) -> std::io::Result<()> {
        populate_write(base, len)
    }
    let attempt = HugepageAttempt {
        map_flags: 0,
        populate: populate_ok,
    };
    let (base, huge) = map_chunk(Some(&attempt)).expect("chunk");
    assert_eq!(base % DMA_CHUNK_SIZE, 0);
    if !huge {
        eprintln!("skipped: the kernel did not 2 MiB-align an anonymous 2 MiB mapping");
    }
}

/// The environment variable naming the cgroup a child test process moves itself into.
const HUGETLB_CHILD_ENV: &str = "SPOOL_TEST_HUGETLB_CGROUP";

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            meminfo
                .lines()
                .find_map(|line| line.strip_prefix("HugePages_Free:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn under_a_hugetlb_cgroup_limit_chunks_fall_back_instead_of_sigbus() {
    if let Some(cgroup) = std::env::var_os(HUGETLB_CHILD_ENV) {
        // The child: move into the limited cgroup, then allocate and write a hugepage chunk.
        let procs = std::path::Path::new(&cgroup).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string()).expect("join the cgroup");
        let pool = private_pool(true, 1);
        let mut b = pool.alloc(DMA_CHUNK_SIZE).expect("alloc");
        fill_pattern(&mut b, 3);
        assert!(check_pattern(&b, 3));
        assert!(
            !b.is_hugepage(),
            "hugetlb.2MB.max is 0: the chunk must be ordinary pages"
        );
        return;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let skip = if !is_root {
        Some("not root".to_owned())
    } else if !controllers.split_whitespace().any(|c| c == "hugetlb") {
        Some("no cgroup v2 hugetlb controller at /sys/fs/cgroup".to_owned())
    } else if free_hugepages() == 0 {
        Some("no free 2 MiB hugepages (HugePages_Free is 0)".to_owned())
    } else {
        None
    };
    if let Some(why) = skip {
        eprintln!("skipped: cannot set up a hugetlb cgroup limit here: {why}");
        return;
    }
    let dir = root.join(format!("spool-hugetlb-test-{}", std::process::id()));
    let setup = (|| -> std::io::Result<()> {
        // Enabling may fail if already enabled or refused; the limit write below tells.
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+hugetlb");
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("hugetlb.2MB.max"), "0")
    })();
    if let Err(err) = setup {
        let _ = std::fs::remove_dir(&dir);
        eprintln!("skipped: cannot set up a hugetlb cgroup limit here: {err}");
        return;
    }
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "dma::tests::under_a_hugetlb_cgroup_limit_chunks_fall_back_instead_of_sigbus",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HUGETLB_CHILD_ENV, &dir)
        .status()
        .expect("spawn the child test");
    let _ = std::fs::remove_dir(&dir);
    assert!(
        status.success(),
        "the child under hugetlb.2MB.max=0 failed ({status}); a signal here is the SIGBUS of an \
         unpopulated hugepage chunk"
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

#[test]
fn set_len_reuses_the_block_within_its_capacity_only() {
    let mut buf = DmaBuf::alloc(4096).unwrap();
    fill_pattern(&mut buf, 7);
    let capacity = buf.capacity();
    buf.set_len(512).unwrap();
    assert_eq!(buf.len(), 512);
    assert!(
        check_pattern(&buf, 7),
        "the first bytes keep their contents"
    );
    buf.set_len(capacity).unwrap();
    assert_eq!(buf.len(), capacity);
    assert!(matches!(
        buf.set_len(capacity + 1),
        Err(DmaError::InvalidLength { .. })
    ));
    assert!(matches!(
        buf.set_len(0),
        Err(DmaError::InvalidLength { .. })
    ));
    assert_eq!(
        buf.len(),
        capacity,
        "a refused change leaves the length alone"
    );
}
