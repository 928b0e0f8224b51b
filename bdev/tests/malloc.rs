//! Goal: the malloc bdev stores exactly the bytes written, at the right place, and nothing
//! else, on real reactors (one and two) and under simulation. Method: distinct patterns at
//! many offsets read back; vectored requests whose buffer lengths cross block and word
//! boundaries, against a plain byte model; unmap/write-zeroes with their neighbours checked;
//! the -EINVAL cases; a proptest of random operation sequences against the model; and a check
//! that data moves at completion time (a read racing a write sees it or not, by the seed).

use std::sync::Arc;

use proptest::prelude::*;
use spool_bdev::{Bdev, BdevChannel, BdevDesc, DmaBuf, MallocBdev};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions};

/// Bytes that differ from one seed to another and from zero almost everywhere.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn buf_of(data: &[u8]) -> DmaBuf {
    let mut buf = DmaBuf::alloc(data.len()).unwrap();
    buf.copy_from_slice(data);
    buf
}

fn bufs_of(data: &[u8], lens: &[usize]) -> Vec<DmaBuf> {
    assert_eq!(lens.iter().sum::<usize>(), data.len());
    let mut at = 0;
    lens.iter()
        .map(|&len| {
            let buf = buf_of(&data[at..at + len]);
            at += len;
            buf
        })
        .collect()
}

fn concat(bufs: &[DmaBuf]) -> Vec<u8> {
    bufs.iter().flat_map(|buf| buf.iter().copied()).collect()
}

fn malloc(block_size: u32, block_count: u64) -> (Arc<MallocBdev>, BdevDesc) {
    let bdev = Arc::new(MallocBdev::new("malloc0", block_size, block_count).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    (bdev, desc)
}

fn one_reactor() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap()
}

async fn write(channel: &BdevChannel, offset: u64, data: &[u8]) {
    let (result, _) = channel.write(buf_of(data), offset).await;
    result.unwrap_or_else(|err| panic!("write {} at {offset}: {err}", data.len()));
}

async fn read(channel: &BdevChannel, offset: u64, len: usize) -> Vec<u8> {
    let (result, buf) = channel.read(DmaBuf::alloc(len).unwrap(), offset).await;
    result.unwrap_or_else(|err| panic!("read {len} at {offset}: {err}"));
    buf.to_vec()
}

/// The (offset, length) of the writes both read-after-write tests make: many offsets, lengths
/// of 1 to 8 blocks, none overlapping.
fn scattered_extents(block: u64) -> Vec<(u64, usize)> {
    (0..64u64)
        .map(|index| {
            let blocks = 1 + (index * 7) % 8;
            (
                index * 16 * block + (index % 5) * block,
                (blocks * block) as usize,
            )
        })
        .collect()
}

/// Writes a distinct pattern at every extent (all in flight at once), reads each back, and
/// checks the whole image against a model.
async fn read_after_write(channel: BdevChannel, block: u64) -> Vec<u8> {
    let extents = scattered_extents(block);
    let mut model = vec![0u8; channel.size_bytes() as usize];
    let mut writes = Vec::new();
    for (index, &(offset, len)) in extents.iter().enumerate() {
        let data = pattern(index as u64 + 1, len);
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
        writes.push(channel.write(buf_of(&data), offset));
    }
    for future in writes {
        future.await.0.unwrap();
    }
    for (index, &(offset, len)) in extents.iter().enumerate() {
        let back = read(&channel, offset, len).await;
        assert!(
            back == pattern(index as u64 + 1, len),
            "extent {index} ({len} bytes at {offset}) reads back what was written"
        );
    }
    model
}

#[test]
fn read_after_write_on_a_runtime() {
    let runtime = one_reactor();
    let (bdev, desc) = malloc(4096, 4096);
    let model = runtime
        .block_on(ReactorId(0), move || async move {
            read_after_write(desc.channel().unwrap(), 4096).await
        })
        .unwrap();
    assert!(bdev.snapshot() == model, "the image is exactly the model");
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn read_after_write_under_simulation() {
    for seed in [1, 2, 3] {
        let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
        let (bdev, desc) = malloc(512, 8192);
        let model = sim
            .block_on(ReactorId(0), move || async move {
                read_after_write(desc.channel().unwrap(), 512).await
            })
            .unwrap();
        assert!(bdev.snapshot() == model, "seed {seed}: image is the model");
    }
}

#[test]
fn vectored_requests_cross_block_and_buffer_boundaries() {
    // Lengths crossing blocks (6144), splitting 8-byte words between buffers (6141 + 3), and
    // reads split differently from the writes that stored the data.
    let write_splits: [&[usize]; 3] = [&[6144, 2048, 4096], &[6141, 3, 2052, 4092], &[12288]];
    let read_splits: [&[usize]; 3] = [&[4096, 4096, 4096], &[100, 8000, 4188], &[1, 12286, 1]];
    for block_size in [4096u32, 512] {
        let mut sim = Sim::new(SimOptions {
            seed: u64::from(block_size),
            reactors: 1,
        });
        let (bdev, desc) = malloc(block_size, 256);
        let model = sim
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                let mut model = vec![0u8; channel.size_bytes() as usize];
                let block = u64::from(block_size);
                let mut seed = 100;
                for (w, split) in write_splits.iter().enumerate() {
                    for offset in [0, block, 3 * block, 7 * block + 8192] {
                        seed += 1;
                        let data = pattern(seed, 12288);
                        let (result, bufs) = channel.writev(bufs_of(&data, split), offset).await;
                        result.unwrap();
                        assert_eq!(concat(&bufs), data, "writev hands its buffers back intact");
                        let at = offset as usize;
                        model[at..at + data.len()].copy_from_slice(&data);
                        for (r, read_split) in read_splits.iter().enumerate() {
                            let bufs = read_split
                                .iter()
                                .map(|&len| DmaBuf::alloc_zeroed(len).unwrap())
                                .collect();
                            let (result, bufs) = channel.readv(bufs, offset).await;
                            result.unwrap();
                            let lens: Vec<usize> = bufs.iter().map(|buf| buf.len()).collect();
                            assert_eq!(&lens, read_split, "buffers come back in order");
                            assert!(
                                concat(&bufs) == model[at..at + 12288],
                                "block {block_size}: writev split {w} at {offset}, readv split {r}"
                            );
                        }
                    }
                }
                // Whole-device vectored read in odd pieces.
                let size = channel.size_bytes() as usize;
                let lens = [size - 4099, 4000, 99];
                let bufs = lens.iter().map(|&l| DmaBuf::alloc(l).unwrap()).collect();
                let (result, bufs) = channel.readv(bufs, 0).await;
                result.unwrap();
                assert!(concat(&bufs) == model, "whole-device readv is the model");
                model
            })
            .unwrap();
        assert!(
            bdev.snapshot() == model,
            "block {block_size}: image is the model"
        );
    }
}

#[test]
fn unmap_and_write_zeroes_read_back_zeros_and_spare_their_neighbours() {
    let runtime = one_reactor();
    let (bdev, desc) = malloc(4096, 64);
    assert!(bdev.unmap_reads_zeroes());
    let size = bdev.size_bytes() as usize;
    let full = pattern(7, size);
    let expected = {
        let mut model = full.clone();
        model[4096..3 * 4096].fill(0); // unmap blocks 1..3
        model[10 * 4096..11 * 4096].fill(0); // write_zeroes block 10
        model[60 * 4096..].fill(0); // unmap the last 4 blocks
        model
    };
    let image = full.clone();
    runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            write(&channel, 0, &image).await;
            channel.unmap(4096, 2 * 4096).await.unwrap();
            channel.write_zeroes(10 * 4096, 4096).await.unwrap();
            channel.unmap(60 * 4096, 4 * 4096).await.unwrap();
            assert!(read(&channel, 0, image.len()).await == expected);
        })
        .unwrap();
    let snapshot = bdev.snapshot();
    assert!(snapshot[..4096] == full[..4096], "block 0 untouched");
    assert!(snapshot[4096..3 * 4096].iter().all(|&b| b == 0));
    assert!(snapshot[3 * 4096..10 * 4096] == full[3 * 4096..10 * 4096]);
    assert!(snapshot[10 * 4096..11 * 4096].iter().all(|&b| b == 0));
    assert!(snapshot[11 * 4096..60 * 4096] == full[11 * 4096..60 * 4096]);
    assert!(snapshot[60 * 4096..].iter().all(|&b| b == 0));
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn misaligned_and_out_of_range_requests_get_einval() {
    let mut sim = Sim::new(SimOptions {
        seed: 11,
        reactors: 1,
    });
    let (bdev, desc) = malloc(4096, 16);
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let size = channel.size_bytes();
        for (offset, len) in [
            (1u64, 4096usize),
            (512, 4096),
            (0, 1000),
            (0, 4097),
            (size, 4096),
            (size - 4096, 8192),
            (u64::MAX - 4095, 4096),
        ] {
            let (result, buf) = channel.write(buf_of(&pattern(3, len)), offset).await;
            assert_eq!(
                result.unwrap_err().errno(),
                -libc::EINVAL,
                "write {len}@{offset}"
            );
            assert_eq!(buf.len(), len);
            let (result, _) = channel.read(DmaBuf::alloc(len).unwrap(), offset).await;
            assert_eq!(
                result.unwrap_err().errno(),
                -libc::EINVAL,
                "read {len}@{offset}"
            );
        }
        let (result, _) = channel
            .writev(vec![buf_of(&[1; 3000]), buf_of(&[2; 3000])], 0)
            .await;
        assert_eq!(
            result.unwrap_err().errno(),
            -libc::EINVAL,
            "6000-byte writev"
        );
        let (result, _) = channel
            .readv(vec![DmaBuf::alloc(4096).unwrap()], size)
            .await;
        assert_eq!(
            result.unwrap_err().errno(),
            -libc::EINVAL,
            "readv past the end"
        );
        for (offset, len) in [
            (1u64, 4096u64),
            (0, 100),
            (size, 4096),
            (0, 0),
            (0, size + 4096),
        ] {
            let err = channel.unmap(offset, len).await.unwrap_err();
            assert_eq!(err.errno(), -libc::EINVAL, "unmap {len}@{offset}");
            let err = channel.write_zeroes(offset, len).await.unwrap_err();
            assert_eq!(err.errno(), -libc::EINVAL, "write_zeroes {len}@{offset}");
        }
        assert_eq!(channel.in_flight(), 0);
    })
    .unwrap();
    assert!(
        bdev.snapshot().iter().all(|&b| b == 0),
        "no rejected request changed the image"
    );
}

#[test]
fn construction_checks_its_arguments() {
    for block_size in [0u32, 256, 511, 1000, 4097] {
        let err = MallocBdev::new("bad", block_size, 8).unwrap_err();
        assert_eq!(err.errno(), -libc::EINVAL, "block size {block_size}");
    }
    assert_eq!(
        MallocBdev::new("bad", 4096, 0).unwrap_err().errno(),
        -libc::EINVAL
    );
    assert_eq!(
        MallocBdev::new("bad", 4096, u64::MAX).unwrap_err().errno(),
        -libc::EINVAL
    );
    assert!(MallocBdev::from_image("bad", 4096, &[0; 4000]).is_err());
    assert!(MallocBdev::from_image("bad", 4096, &[]).is_err());

    let image = pattern(42, 8 * 512);
    let bdev = MallocBdev::from_image("img", 512, &image).unwrap();
    assert_eq!((bdev.block_size(), bdev.block_count()), (512, 8));
    assert!(
        bdev.snapshot() == image,
        "from_image then snapshot round-trips"
    );
    let fresh = MallocBdev::new("zero", 512, 8).unwrap();
    assert!(
        fresh.snapshot().iter().all(|&b| b == 0),
        "new devices are zeroed"
    );
}

#[test]
fn data_written_on_reactor_0_is_read_on_reactor_1() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0, 1],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let (bdev, desc) = malloc(4096, 1024);
    let extents = scattered_extents(4096);
    let (writer_desc, writer_extents) = (desc.clone(), extents.clone());
    runtime
        .block_on(ReactorId(0), move || async move {
            let channel = writer_desc.channel().unwrap();
            for (index, &(offset, len)) in writer_extents.iter().enumerate() {
                write(&channel, offset, &pattern(1000 + index as u64, len)).await;
            }
        })
        .unwrap();
    let mismatches = runtime
        .block_on(ReactorId(1), move || async move {
            let channel = desc.channel().unwrap();
            let mut mismatches = Vec::new();
            for (index, &(offset, len)) in extents.iter().enumerate() {
                if read(&channel, offset, len).await != pattern(1000 + index as u64, len) {
                    mismatches.push(index);
                }
            }
            // And back: reactor 1 overwrites the first extent for reactor 0 to see.
            write(&channel, 0, &pattern(5, 4096)).await;
            mismatches
        })
        .unwrap();
    assert!(
        mismatches.is_empty(),
        "extents read wrong on reactor 1: {mismatches:?}"
    );
    assert!(bdev.snapshot()[..4096] == pattern(5, 4096));
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn data_moves_at_completion_so_a_racing_read_sees_the_write_or_not_by_the_seed() {
    // A read submitted before a write of the same block: data moving at submission would
    // always give the old bytes; at completion, the seed decides, and the bytes are whole.
    let old = pattern(1, 4096);
    let new = pattern(2, 4096);
    let mut saw = (false, false);
    for seed in 0..64 {
        let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
        let image = [old.clone(), vec![0; 4096]].concat();
        let bdev = Arc::new(MallocBdev::from_image("race", 4096, &image).unwrap());
        let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
        let new_data = new.clone();
        let got = sim
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                let reading = channel.read(DmaBuf::alloc(4096).unwrap(), 0);
                let writing = channel.write(buf_of(&new_data), 0);
                let (result, buf) = reading.await;
                result.unwrap();
                writing.await.0.unwrap();
                buf.to_vec()
            })
            .unwrap();
        if got == old {
            saw.0 = true;
        } else if got == new {
            saw.1 = true;
        } else {
            panic!("seed {seed}: the read saw a mix of old and new bytes");
        }
        assert!(
            bdev.snapshot()[..4096] == new[..],
            "seed {seed}: the write landed"
        );
    }
    assert!(
        saw.0 && saw.1,
        "across seeds the read completed both before and after the write: {saw:?}"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        data_seed: u64,
        lens: Vec<usize>,
    },
    Read {
        block: u64,
        lens: Vec<usize>,
    },
    Unmap {
        block: u64,
        blocks: u64,
    },
    WriteZeroes {
        block: u64,
        blocks: u64,
    },
}

const PROP_BLOCK: u64 = 512;
const PROP_BLOCKS: u64 = 64;

/// Buffer lengths (each 1..=len) summing to `blocks` blocks.
fn split_strategy(blocks: u64) -> impl Strategy<Value = Vec<usize>> {
    let total = (blocks * PROP_BLOCK) as usize;
    proptest::collection::vec(1usize..total, 0..4).prop_map(move |mut cuts| {
        cuts.sort_unstable();
        cuts.dedup();
        let mut lens = Vec::new();
        let mut previous = 0;
        for cut in cuts.into_iter().chain([total]) {
            lens.push(cut - previous);
            previous = cut;
        }
        lens
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let extent =
        (0..PROP_BLOCKS).prop_flat_map(|block| (Just(block), 1..=(PROP_BLOCKS - block).min(8)));
    prop_oneof![
        3 => extent.clone().prop_flat_map(|(block, blocks)| (Just(block), any::<u64>(), split_strategy(blocks)))
            .prop_map(|(block, data_seed, lens)| Op::Write { block, data_seed, lens }),
        3 => extent.clone().prop_flat_map(|(block, blocks)| (Just(block), split_strategy(blocks)))
            .prop_map(|(block, lens)| Op::Read { block, lens }),
        1 => extent.clone().prop_map(|(block, blocks)| Op::Unmap { block, blocks }),
        1 => extent.prop_map(|(block, blocks)| Op::WriteZeroes { block, blocks }),
    ]
}

/// Runs `ops` in order on a fresh device under `Sim` with `seed`; returns the first mismatch
/// with the model, if any.
fn run_against_model(seed: u64, ops: Vec<Op>) -> Result<(), String> {
    let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
    let (bdev, desc) = malloc(PROP_BLOCK as u32, PROP_BLOCKS);
    let model = sim
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let mut model = vec![0u8; (PROP_BLOCK * PROP_BLOCKS) as usize];
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Write {
                        block,
                        data_seed,
                        lens,
                    } => {
                        let data = pattern(data_seed, lens.iter().sum());
                        let at = (block * PROP_BLOCK) as usize;
                        let (result, _) = channel.writev(bufs_of(&data, &lens), at as u64).await;
                        result.map_err(|err| format!("step {step}: {err}"))?;
                        model[at..at + data.len()].copy_from_slice(&data);
                    }
                    Op::Read { block, lens } => {
                        let bufs = lens
                            .iter()
                            .map(|&len| DmaBuf::alloc(len).unwrap())
                            .collect();
                        let at = (block * PROP_BLOCK) as usize;
                        let (result, bufs) = channel.readv(bufs, at as u64).await;
                        result.map_err(|err| format!("step {step}: {err}"))?;
                        let got = concat(&bufs);
                        if got != model[at..at + got.len()] {
                            return Err(format!("step {step}: read at block {block} differs"));
                        }
                    }
                    Op::Unmap { block, blocks } | Op::WriteZeroes { block, blocks } => {
                        let (at, len) = (block * PROP_BLOCK, blocks * PROP_BLOCK);
                        let result = if matches!(op, Op::Unmap { .. }) {
                            channel.unmap(at, len).await
                        } else {
                            channel.write_zeroes(at, len).await
                        };
                        result.map_err(|err| format!("step {step}: {err}"))?;
                        model[at as usize..(at + len) as usize].fill(0);
                    }
                }
            }
            Ok::<_, String>(model)
        })
        .map_err(|err| err.to_string())??;
    if bdev.snapshot() != model {
        return Err("final image differs from the model".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_a_byte_model(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        prop_assert_eq!(run_against_model(seed, ops), Ok(()));
    }
}

/// Throughput smoke check, not a benchmark: run with
/// `cargo test -p spool-bdev --release --test malloc -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run in release by hand"]
fn malloc_4k_random_rate_on_one_core() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Busy,
        pin: true,
    })
    .unwrap();
    let (_bdev, desc) = malloc(4096, 1 << 18); // 1 GiB
    let rates = runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let depth = 32;
            let ios = 2_000_000u64;
            let mut rates = Vec::new();
            for writing in [false, true] {
                let mut bufs: Vec<DmaBuf> =
                    (0..depth).map(|_| DmaBuf::alloc(4096).unwrap()).collect();
                let mut rng = 0x1234_5678_9abc_def1u64;
                let start = std::time::Instant::now();
                let mut done = 0;
                while done < ios {
                    let mut futures = Vec::with_capacity(depth);
                    for buf in bufs.drain(..) {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let offset = (rng % (1 << 18)) * 4096;
                        futures.push(if writing {
                            channel.write(buf, offset)
                        } else {
                            channel.read(buf, offset)
                        });
                    }
                    for future in futures {
                        let (result, buf) = future.await;
                        result.unwrap();
                        bufs.push(buf);
                    }
                    done += depth as u64;
                }
                rates.push(done as f64 / start.elapsed().as_secs_f64());
            }
            rates
        })
        .unwrap();
    println!(
        "malloc 4 KiB QD32 batched: randread {:.0} IOPS, randwrite {:.0} IOPS",
        rates[0], rates[1]
    );
    runtime.stop();
}

/// A request larger than one pass's budget moves in parts, in order, across passes: a
/// vectored write of 1.25 MiB whose buffer boundaries fall inside parts, read back with
/// another split, and a 1.5 MiB unmap, on a real reactor (the simulation moves requests
/// whole), match a byte model exactly.
#[test]
fn requests_larger_than_a_pass_move_in_parts_and_land_whole() {
    let runtime = one_reactor();
    let (bdev, desc) = malloc(4096, 1024);
    let model = runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let mut model = vec![0u8; channel.size_bytes() as usize];
            let data = pattern(31, 1280 << 10);
            let write_split = [100_000, 262_144, 4096, 700_000, 1280 * 1024 - 1_066_240];
            let (result, _) = channel.writev(bufs_of(&data, &write_split), 8192).await;
            result.unwrap();
            model[8192..8192 + data.len()].copy_from_slice(&data);
            channel.unmap(1 << 20, 1536 << 10).await.unwrap();
            model[1 << 20..(1 << 20) + (1536 << 10)].fill(0);
            let read_split = [1, 262_143, 262_145, (3 << 20) - 524_289];
            let bufs = read_split
                .iter()
                .map(|&len| DmaBuf::alloc(len).unwrap())
                .collect();
            let (result, bufs) = channel.readv(bufs, 0).await;
            result.unwrap();
            assert!(
                concat(&bufs) == model[..3 << 20],
                "a readv in parts differs from the model"
            );
            model
        })
        .unwrap();
    assert!(bdev.snapshot() == model, "the image differs from the model");
    assert_eq!(runtime.stop().leaked_channels, 0);
}

/// One pass moves at most a budget of bytes per channel, also inside one request: a 4 KiB
/// read on another channel of the same reactor (the metadata's private channel, say)
/// completes while a 1 MiB write submitted before it is still moving, instead of waiting
/// for the whole copy. (With requests moved whole, the write finished in the same pass.)
#[test]
fn a_small_request_on_another_channel_is_not_held_behind_a_large_copy() {
    use std::future::Future;
    use std::task::Poll;

    let runtime = one_reactor();
    let (bdev, desc) = malloc(4096, 1024);
    let big = pattern(41, 1 << 20);
    let expected = big.clone();
    let big_done_first = runtime
        .block_on(ReactorId(0), move || async move {
            let bulk = desc.channel().unwrap();
            let small = desc.private_channel().unwrap();
            let mut big_write = std::pin::pin!(bulk.write(buf_of(&big), 0));
            // Submit the large write first (its first poll), then the small read.
            std::future::poll_fn(|cx| {
                assert!(big_write.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            let _ = read(&small, 2 << 20, 4096).await;
            let big_done_first =
                std::future::poll_fn(|cx| Poll::Ready(big_write.as_mut().poll(cx).is_ready()))
                    .await;
            if !big_done_first {
                let (result, _) = big_write.await;
                result.unwrap();
            }
            big_done_first
        })
        .unwrap();
    assert!(
        !big_done_first,
        "the 4 KiB read waited for the whole 1 MiB copy"
    );
    assert!(bdev.snapshot()[..1 << 20] == expected);
    assert_eq!(runtime.stop().leaked_channels, 0);
}
