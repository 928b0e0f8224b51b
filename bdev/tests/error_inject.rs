//! Goal: every rule form of the error bdev fails exactly the requests it names, with exactly
//! its errno, and those requests never reach the inner device; every other request reaches
//! it and its data is really stored. Method: an error bdev over a malloc bdev; each test
//! checks the caller's errno, the inner device's image, and the counters.

use std::sync::Arc;

use spool_bdev::{
    Bdev, BdevChannel, BdevDesc, DmaBuf, ErrorBdev, ErrorRule, IoKind, MallocBdev, RuleStats,
};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions};

const BLOCK: u64 = 4096;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1)
        .collect()
}

fn buf_of(data: &[u8]) -> DmaBuf {
    let mut buf = DmaBuf::alloc(data.len()).unwrap();
    buf.copy_from_slice(data);
    buf
}

/// An error bdev over a 64-block malloc bdev; the inner device is returned to check its image.
fn stack() -> (Arc<MallocBdev>, Arc<ErrorBdev>, BdevDesc) {
    let inner = Arc::new(MallocBdev::new("malloc0", BLOCK as u32, 64).unwrap());
    let error = Arc::new(ErrorBdev::new(
        "error0",
        Arc::clone(&inner) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&error) as Arc<dyn Bdev>).expect("open bdev");
    (inner, error, desc)
}

/// Writes `data` at `offset`; returns 0 or the errno the caller got.
async fn write(channel: &BdevChannel, offset: u64, data: &[u8]) -> i32 {
    let (result, buf) = channel.write(buf_of(data), offset).await;
    assert!(&buf[..] == data, "the buffer comes back untouched");
    result.map_or_else(|err| err.errno(), |()| 0)
}

/// Reads `len` bytes at `offset`: the bytes, or the errno the caller got.
async fn read(channel: &BdevChannel, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let (result, buf) = channel.read(DmaBuf::alloc(len).unwrap(), offset).await;
    result.map(|()| buf.to_vec()).map_err(|err| err.errno())
}

fn errno_of(result: Result<(), spool_bdev::BdevError>) -> i32 {
    result.map_or_else(|err| err.errno(), |()| 0)
}

fn sim(seed: u64) -> Sim {
    Sim::new(SimOptions { seed, reactors: 1 })
}

#[test]
fn the_wrapper_has_the_inner_geometry_and_its_own_name() {
    let (inner, error, _desc) = stack();
    assert_eq!(error.name(), "error0");
    assert_eq!(error.block_size(), inner.block_size());
    assert_eq!(error.block_count(), inner.block_count());
    assert!(error.unmap_reads_zeroes());
    assert_eq!(error.inner().name(), "malloc0");
}

#[test]
fn without_rules_every_request_passes_and_is_stored() {
    let (inner, error, desc) = stack();
    sim(1)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            assert_eq!(write(&channel, 0, &pattern(1, 8192)).await, 0);
            assert_eq!(read(&channel, 0, 8192).await, Ok(pattern(1, 8192)));
            let (result, _) = channel
                .writev(
                    vec![buf_of(&pattern(2, 2048)), buf_of(&pattern(3, 2048))],
                    8192,
                )
                .await;
            result.unwrap();
            channel.flush().await.unwrap();
            channel.write_zeroes(0, 4096).await.unwrap();
        })
        .unwrap();
    let image = inner.snapshot();
    assert!(
        image[..4096].iter().all(|&b| b == 0),
        "write_zeroes reached the inner device"
    );
    assert!(image[4096..8192] == pattern(1, 8192)[4096..]);
    assert!(image[8192..10240] == pattern(2, 2048)[..]);
    assert!(image[10240..12288] == pattern(3, 2048)[..]);
    assert_eq!(error.injected_count(), 0);
    assert_eq!(error.seen_count(IoKind::Write), 2);
    assert_eq!(error.seen_count(IoKind::Read), 1);
    assert_eq!(error.seen_count(IoKind::Flush), 1);
    assert_eq!(error.seen_count(IoKind::WriteZeroes), 1);
    assert_eq!(error.seen_count(IoKind::Unmap), 0);
}

#[test]
fn a_kind_filter_fails_only_that_kind_with_its_errno() {
    let (inner, error, desc) = stack();
    let rule = error.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Write]));
    let driver = Arc::clone(&error);
    sim(2)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            for block in 0..4 {
                assert_eq!(
                    write(&channel, block * BLOCK, &pattern(9, 4096)).await,
                    -libc::EIO
                );
            }
            let (result, _) = channel.writev(vec![buf_of(&pattern(9, 4096))], 0).await;
            assert_eq!(errno_of(result), -libc::EIO, "writev is a write");
            assert_eq!(
                read(&channel, 0, 4096).await,
                Ok(vec![0; 4096]),
                "reads pass"
            );
            assert_eq!(errno_of(channel.unmap(0, 4096).await), 0);
            assert_eq!(errno_of(channel.flush().await), 0);
            driver.clear_rules();
            assert_eq!(write(&channel, 0, &pattern(9, 4096)).await, 0);
        })
        .unwrap();
    assert!(inner.snapshot()[..4096] == pattern(9, 4096)[..]);
    assert!(
        inner.snapshot()[4096..].iter().all(|&b| b == 0),
        "no failed write landed"
    );
    assert_eq!(error.injected_count(), 5);
    assert_eq!(error.rule_stats(rule), None, "cleared");
}

#[test]
fn a_range_filter_fails_only_overlapping_requests() {
    let (inner, error, desc) = stack();
    // Bytes 8192..12288 (block 2) and, separately, blocks 10..12.
    let bytes = error.add_rule(ErrorRule::new(-libc::ENOSPC).range_bytes(8192..12288));
    let blocks = error.add_rule(
        ErrorRule::new(-libc::EROFS)
            .kinds(&[IoKind::Write, IoKind::Unmap])
            .range_blocks(10..12),
    );
    let driver = Arc::clone(&error);
    sim(3)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let cases: [(u64, u64, i32); 8] = [
                (1, 1, 0),             // ends where the range starts
                (3, 1, 0),             // starts where it ends
                (2, 1, -libc::ENOSPC), // exactly it
                (1, 2, -libc::ENOSPC), // overlaps its start
                (0, 8, -libc::ENOSPC), // covers it
                (9, 1, 0),
                (11, 2, -libc::EROFS),
                (12, 1, 0),
            ];
            for (block, count, errno) in cases {
                let data = pattern(block as u8, (count * BLOCK) as usize);
                assert_eq!(
                    write(&channel, block * BLOCK, &data).await,
                    errno,
                    "write of {count} blocks at block {block}"
                );
            }
            assert_eq!(read(&channel, 2 * BLOCK, 4096).await, Err(-libc::ENOSPC));
            assert_eq!(read(&channel, 10 * BLOCK, 4096).await.map(|_| ()), Ok(()));
            assert_eq!(
                errno_of(channel.unmap(10 * BLOCK, BLOCK).await),
                -libc::EROFS
            );
            assert_eq!(errno_of(channel.write_zeroes(10 * BLOCK, BLOCK).await), 0);
            assert_eq!(
                errno_of(channel.flush().await),
                -libc::ENOSPC,
                "a flush covers the whole device"
            );
            assert!(driver.remove_rule(bytes));
            assert_eq!(errno_of(channel.flush().await), 0);
            assert_eq!(write(&channel, 2 * BLOCK, &pattern(2, 4096)).await, 0);
        })
        .unwrap();
    let image = inner.snapshot();
    let block = |n: u64| &image[(n * BLOCK) as usize..((n + 1) * BLOCK) as usize];
    assert!(*block(1) == pattern(1, 4096)[..]);
    assert!(
        *block(2) == pattern(2, 4096)[..],
        "written after the rule was removed"
    );
    assert!(*block(3) == pattern(3, 4096)[..]);
    assert!(*block(9) == pattern(9, 4096)[..]);
    assert!(*block(12) == pattern(12, 4096)[..]);
    for n in [0, 4, 5, 6, 7, 10, 11, 13] {
        assert!(
            block(n).iter().all(|&b| b == 0),
            "block {n} was only touched by failed I/O"
        );
    }
    assert_eq!(
        error.rule_stats(blocks),
        Some(RuleStats {
            matched: 2,
            injected: 2
        })
    );
    assert_eq!(error.rule_stats(bytes), None);
    assert!(!error.remove_rule(bytes), "a rule is removed once");
}

#[test]
fn nth_fails_exactly_the_nth_matching_request() {
    let (_inner, error, desc) = stack();
    let rule = error.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Read]).nth(3));
    let results = sim(4)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let mut results = Vec::new();
            for index in 0..6u64 {
                // Writes in between must not count towards the read rule.
                assert_eq!(write(&channel, index * BLOCK, &pattern(1, 4096)).await, 0);
                results.push(read(&channel, index * BLOCK, 4096).await.map(|_| ()));
            }
            results
        })
        .unwrap();
    assert_eq!(
        results,
        vec![Ok(()), Ok(()), Err(-libc::EIO), Ok(()), Ok(()), Ok(())]
    );
    assert_eq!(
        error.rule_stats(rule),
        Some(RuleStats {
            matched: 6,
            injected: 1
        })
    );
}

#[test]
fn nth_counts_requests_in_flight_together_in_submission_order() {
    // Completion order varies with the seed; the request failed is always the 5th submitted.
    for seed in 0..8 {
        let (_inner, error, desc) = stack();
        error.add_rule(ErrorRule::new(-libc::EIO).nth(5));
        let statuses = sim(seed)
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                let futures: Vec<_> = (0..8u64)
                    .map(|block| channel.read(DmaBuf::alloc(4096).unwrap(), block * BLOCK))
                    .collect();
                let mut statuses = Vec::new();
                for future in futures {
                    statuses.push(errno_of(future.await.0));
                }
                statuses
            })
            .unwrap();
        assert_eq!(
            statuses,
            vec![0, 0, 0, 0, -libc::EIO, 0, 0, 0],
            "seed {seed}"
        );
        assert_eq!(error.injected_count(), 1);
    }
}

#[test]
fn count_fails_that_many_then_lets_requests_through() {
    let (inner, error, desc) = stack();
    let rule = error.add_rule(
        ErrorRule::new(-libc::ENOSPC)
            .kinds(&[IoKind::Write])
            .count(2),
    );
    sim(5)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            assert_eq!(write(&channel, 0, &pattern(1, 4096)).await, -libc::ENOSPC);
            assert_eq!(write(&channel, 0, &pattern(2, 4096)).await, -libc::ENOSPC);
            assert_eq!(write(&channel, 0, &pattern(3, 4096)).await, 0);
            assert_eq!(write(&channel, BLOCK, &pattern(4, 4096)).await, 0);
            assert_eq!(
                read(&channel, 0, 8192).await,
                Ok([pattern(3, 4096), pattern(4, 4096)].concat())
            );
        })
        .unwrap();
    assert!(inner.snapshot()[..8192] == [pattern(3, 4096), pattern(4, 4096)].concat()[..]);
    assert_eq!(
        error.rule_stats(rule),
        Some(RuleStats {
            matched: 4,
            injected: 2
        })
    );
    assert_eq!(error.injected_count(), 2);
}

#[test]
fn the_oldest_firing_rule_gives_the_errno_and_positive_errnos_are_negated() {
    let (_inner, error, desc) = stack();
    assert_eq!(ErrorRule::new(libc::EIO).errno(), -libc::EIO);
    assert_eq!(ErrorRule::new(0).errno(), -libc::EIO);
    let first = error.add_rule(
        ErrorRule::new(libc::ENOSPC)
            .kinds(&[IoKind::Write])
            .count(1),
    );
    let second = error.add_rule(ErrorRule::new(-libc::EROFS).kinds(&[IoKind::Write]));
    sim(6)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            assert_eq!(write(&channel, 0, &pattern(1, 4096)).await, -libc::ENOSPC);
            assert_eq!(write(&channel, 0, &pattern(1, 4096)).await, -libc::EROFS);
        })
        .unwrap();
    assert_eq!(
        error.rule_stats(first),
        Some(RuleStats {
            matched: 2,
            injected: 1
        })
    );
    assert_eq!(
        error.rule_stats(second),
        Some(RuleStats {
            matched: 2,
            injected: 1
        }),
        "a later rule counts a request an earlier one failed"
    );
}

#[test]
fn injected_requests_never_reach_the_inner_device() {
    let (inner, error, desc) = stack();
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let before = pattern(7, 64 * 4096);
    let seed_image = before.clone();
    let driver = Arc::clone(&error);
    runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            assert_eq!(write(&channel, 0, &seed_image).await, 0);
            driver.add_rule(ErrorRule::new(-libc::EIO).kinds(&[
                IoKind::Write,
                IoKind::Unmap,
                IoKind::WriteZeroes,
            ]));
            assert_eq!(write(&channel, 0, &pattern(8, 8192)).await, -libc::EIO);
            let (result, bufs) = channel
                .writev(
                    vec![buf_of(&pattern(8, 6144)), buf_of(&pattern(9, 2048))],
                    4096,
                )
                .await;
            assert_eq!(errno_of(result), -libc::EIO);
            assert_eq!(bufs.len(), 2, "writev hands its buffers back on failure");
            assert_eq!(errno_of(channel.unmap(0, 64 * BLOCK).await), -libc::EIO);
            assert_eq!(
                errno_of(channel.write_zeroes(BLOCK, BLOCK).await),
                -libc::EIO
            );
            assert_eq!(
                read(&channel, 0, 64 * 4096).await,
                Ok(seed_image),
                "reads pass"
            );
            assert_eq!(channel.in_flight(), 0);
        })
        .unwrap();
    assert!(
        inner.snapshot() == before,
        "the inner device saw none of the failed requests"
    );
    assert_eq!(error.injected_count(), 4);
    assert_eq!(error.seen_count(IoKind::Write), 3);
    assert_eq!(error.seen_count(IoKind::Unmap), 1);
    assert_eq!(error.seen_count(IoKind::WriteZeroes), 1);
    assert_eq!(error.seen_count(IoKind::Read), 1);
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn rules_can_change_from_another_thread_while_io_runs() {
    let (_inner, error, desc) = stack();
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let rule = error.add_rule(ErrorRule::new(-libc::EIO).kinds(&[IoKind::Read]));
    let run = |desc: BdevDesc| {
        runtime
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                read(&channel, 0, 4096).await.map(|_| ())
            })
            .unwrap()
    };
    assert_eq!(run(desc.clone()), Err(-libc::EIO));
    assert!(error.remove_rule(rule));
    assert_eq!(run(desc.clone()), Ok(()));
    error.add_rule(ErrorRule::new(-libc::EAGAIN));
    assert_eq!(run(desc), Err(-libc::EAGAIN));
    assert_eq!(runtime.stop().leaked_channels, 0);
}
