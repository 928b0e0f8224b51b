//! Goal: the crash bdev's power cut leaves exactly the durable image plus the chosen pending
//! writes (in completion order), a flush makes durable exactly the writes completed before it
//! was submitted, and a simulated crash test replays from its seed. Method: a fixed history
//! with overlapping writes, zeroes and unmaps, cut with every subset of its pending writes and
//! compared byte for byte with a model; flushes racing writes across seeds; requests in
//! flight at a cut.

use std::future::Future;
use std::sync::Arc;

use spool_bdev::{Bdev, BdevChannel, BdevDesc, CrashBdev, DmaBuf, PendingWrite};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions};

const BLOCK: usize = 512;
const BLOCKS: u64 = 32;
const SIZE: usize = BLOCK * BLOCKS as usize;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(37).wrapping_add((i % 253) as u8) | 1)
        .collect()
}

fn buf_of(data: &[u8]) -> DmaBuf {
    let mut buf = DmaBuf::alloc(data.len()).unwrap();
    buf.copy_from_slice(data);
    buf
}

fn crash_device() -> (Arc<CrashBdev>, BdevDesc) {
    let bdev = Arc::new(CrashBdev::new("crash0", BLOCK as u32, BLOCKS).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).expect("open bdev");
    (bdev, desc)
}

fn sim(seed: u64) -> Sim {
    Sim::new(SimOptions { seed, reactors: 1 })
}

/// One step of a history: what the channel does, and the bytes it leaves (None for flush).
#[derive(Debug, Clone)]
enum Step {
    Write { block: usize, data: Vec<u8> },
    Writev { block: usize, parts: Vec<Vec<u8>> },
    Zeroes { block: usize, blocks: usize },
    Unmap { block: usize, blocks: usize },
    Flush,
}

impl Step {
    /// The (byte offset, bytes) the step writes, if it writes.
    fn effect(&self) -> Option<(usize, Vec<u8>)> {
        match self {
            Step::Write { block, data } => Some((block * BLOCK, data.clone())),
            Step::Writev { block, parts } => Some((block * BLOCK, parts.concat())),
            Step::Zeroes { block, blocks } | Step::Unmap { block, blocks } => {
                Some((block * BLOCK, vec![0; blocks * BLOCK]))
            }
            Step::Flush => None,
        }
    }

    async fn run(&self, channel: &BdevChannel) {
        match self {
            Step::Write { block, data } => {
                channel
                    .write(buf_of(data), (block * BLOCK) as u64)
                    .await
                    .0
                    .unwrap();
            }
            Step::Writev { block, parts } => {
                let bufs = parts.iter().map(|part| buf_of(part)).collect();
                channel
                    .writev(bufs, (block * BLOCK) as u64)
                    .await
                    .0
                    .unwrap();
            }
            Step::Zeroes { block, blocks } => channel
                .write_zeroes((block * BLOCK) as u64, (blocks * BLOCK) as u64)
                .await
                .unwrap(),
            Step::Unmap { block, blocks } => channel
                .unmap((block * BLOCK) as u64, (blocks * BLOCK) as u64)
                .await
                .unwrap(),
            Step::Flush => channel.flush().await.unwrap(),
        }
    }
}

fn apply(image: &mut [u8], (offset, data): &(usize, Vec<u8>)) {
    image[*offset..*offset + data.len()].copy_from_slice(data);
}

/// Three writes, a flush, then six pending writes overlapping the durable ones and each other.
fn history() -> (Vec<Step>, Vec<Step>) {
    let durable = vec![
        Step::Write {
            block: 0,
            data: pattern(1, 4 * BLOCK),
        },
        Step::Write {
            block: 8,
            data: pattern(2, 2 * BLOCK),
        },
        Step::Write {
            block: 4,
            data: pattern(3, 4 * BLOCK),
        },
        Step::Flush,
    ];
    let pending = vec![
        Step::Write {
            block: 2,
            data: pattern(4, 4 * BLOCK),
        }, // over the 1st and 3rd
        Step::Write {
            block: 4,
            data: pattern(5, BLOCK),
        }, // over the previous
        Step::Zeroes {
            block: 8,
            blocks: 1,
        }, // over the 2nd
        Step::Writev {
            block: 20,
            parts: vec![pattern(6, 700), pattern(7, 1000), pattern(8, 348)],
        },
        Step::Unmap {
            block: 21,
            blocks: 1,
        }, // inside the previous
        Step::Write {
            block: 3,
            data: pattern(9, BLOCK),
        }, // over the 1st pending one
    ];
    (durable, pending)
}

/// Runs the history sequentially (so completion order is program order) on a fresh device.
fn run_history(seed: u64) -> Arc<CrashBdev> {
    let (bdev, desc) = crash_device();
    let (durable, pending) = history();
    sim(seed)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            for step in durable.iter().chain(&pending) {
                step.run(&channel).await;
            }
        })
        .unwrap();
    bdev
}

#[test]
fn cut_power_keeps_exactly_the_chosen_pending_writes() {
    let (durable_steps, pending_steps) = history();
    let mut durable_model = vec![0u8; SIZE];
    for effect in durable_steps.iter().filter_map(Step::effect) {
        apply(&mut durable_model, &effect);
    }
    let effects: Vec<(usize, Vec<u8>)> = pending_steps.iter().filter_map(Step::effect).collect();
    let expected_pending: Vec<PendingWrite> = effects
        .iter()
        .enumerate()
        .map(|(i, (offset, data))| PendingWrite {
            index: 3 + i as u64,
            offset_bytes: *offset as u64,
            len_bytes: data.len() as u64,
        })
        .collect();
    for mask in 0u32..(1 << effects.len()) {
        let bdev = run_history(u64::from(mask));
        assert_eq!(bdev.pending_writes(), expected_pending, "mask {mask:#b}");
        assert!(
            bdev.durable_image() == durable_model,
            "mask {mask:#b}: durable image"
        );
        let kept = |write: &PendingWrite| mask & (1 << (write.index - 3)) != 0;
        let image = bdev.cut_power(kept);

        let mut model = durable_model.clone();
        for (i, effect) in effects.iter().enumerate() {
            if mask & (1 << i) != 0 {
                apply(&mut model, effect);
            }
        }
        // Range by range first, for a readable failure; then the whole image.
        for (i, (offset, data)) in effects.iter().enumerate() {
            let range = *offset..*offset + data.len();
            let survives = (0..data.len()).filter(|&at| {
                !effects[i + 1..].iter().enumerate().any(|(j, (o, d))| {
                    mask & (1 << (i + 1 + j)) != 0 && (*o..*o + d.len()).contains(&(offset + at))
                })
            });
            for at in survives {
                let expect = if mask & (1 << i) != 0 {
                    data[at]
                } else {
                    model[offset + at]
                };
                assert_eq!(
                    image[offset + at],
                    expect,
                    "mask {mask:#b}: byte {} of pending write {i} ({range:?})",
                    at
                );
            }
        }
        assert!(image == model, "mask {mask:#b}: the cut image is the model");
        assert!(
            bdev.durable_image() == model && bdev.live_image() == model,
            "mask {mask:#b}: reset"
        );
        assert_eq!(bdev.writes_since_flush_count(), 0);
    }
}

#[test]
fn keep_none_is_the_durable_image_and_keep_all_the_live_image() {
    let bdev = run_history(1);
    let (durable, live) = (bdev.durable_image(), bdev.live_image());
    assert!(durable != live, "the history left pending writes");
    assert_eq!(bdev.writes_since_flush_count(), 6);
    assert!(bdev.cut_power_keep_none() == durable);
    assert!(bdev.live_image() == durable);

    let bdev = run_history(1);
    assert!(bdev.cut_power_keep_all() == live);
    assert!(
        bdev.durable_image() == live,
        "keeping all makes the live image durable"
    );
}

#[test]
fn after_a_cut_the_device_and_a_reload_read_the_cut_image() {
    let bdev = run_history(2);
    let image = bdev.cut_power(|write| write.index % 2 == 0);
    let reloaded = Arc::new(CrashBdev::from_image("reloaded", BLOCK as u32, &image).unwrap());
    for device in [Arc::clone(&bdev), reloaded] {
        let desc = BdevDesc::open(Arc::clone(&device) as Arc<dyn Bdev>).expect("open bdev");
        let expect = image.clone();
        sim(3)
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                let (result, buf) = channel.read(DmaBuf::alloc(SIZE).unwrap(), 0).await;
                result.unwrap();
                assert!(buf[..] == expect[..], "reads see the cut image");
            })
            .unwrap();
        assert!(device.pending_writes().is_empty());
    }
}

/// Sixteen overlapping writes in flight at once: their completion order comes from the seed.
fn concurrent_writes(seed: u64) -> (Vec<PendingWrite>, Vec<u8>) {
    let (bdev, desc) = crash_device();
    sim(seed)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let futures: Vec<_> = (0..16u8)
                .map(|i| {
                    let block = usize::from(i % 5);
                    channel.write(buf_of(&pattern(i + 1, 2 * BLOCK)), (block * BLOCK) as u64)
                })
                .collect();
            for future in futures {
                future.await.0.unwrap();
            }
        })
        .unwrap();
    (bdev.pending_writes(), bdev.live_image())
}

#[test]
fn under_simulation_the_pending_order_replays_from_the_seed() {
    let submission_order: Vec<u64> = (0..16u64).map(|i| (i % 5) * BLOCK as u64).collect();
    let mut orders = std::collections::HashSet::new();
    for seed in 0..8 {
        let (first, first_image) = concurrent_writes(seed);
        let (second, second_image) = concurrent_writes(seed);
        assert_eq!(first, second, "seed {seed}: same pending list twice");
        assert!(first_image == second_image, "seed {seed}: same image twice");
        assert_eq!(first.len(), 16);
        let offsets: Vec<u64> = first.iter().map(|write| write.offset_bytes).collect();
        orders.insert(offsets);
    }
    assert!(orders.len() > 1, "the completion order depends on the seed");
    assert!(
        orders.iter().any(|order| *order != submission_order),
        "some seed completes out of submission order"
    );
}

/// Writes block 0 (completed), then submits a write of block 1 and a flush together. Returns
/// the device and whether the block-1 write had completed when the flush did.
async fn flush_racing_a_write(bdev: Arc<CrashBdev>, desc: BdevDesc) -> bool {
    let channel = desc.channel().unwrap();
    channel
        .write(buf_of(&pattern(1, BLOCK)), 0)
        .await
        .0
        .unwrap();
    let in_flight = channel.write(buf_of(&pattern(2, BLOCK)), BLOCK as u64);
    // `flush` submits at its first poll, here: the write is still in flight (completions
    // only come from the poller, which has not run since the write was submitted).
    channel.flush().await.unwrap();
    let completed_first = bdev.writes_since_flush_count() == 1;
    in_flight.await.0.unwrap();
    completed_first
}

fn check_flush_race(bdev: &CrashBdev, context: &str) {
    let durable = bdev.durable_image();
    assert!(
        durable[..BLOCK] == pattern(1, BLOCK)[..],
        "{context}: the completed write is durable"
    );
    assert!(
        durable[BLOCK..].iter().all(|&b| b == 0),
        "{context}: the in-flight write is not"
    );
    assert_eq!(
        bdev.pending_writes(),
        vec![PendingWrite {
            index: 1,
            offset_bytes: BLOCK as u64,
            len_bytes: BLOCK as u64
        }],
        "{context}: the in-flight write stays pending"
    );
    assert!(bdev.live_image()[BLOCK..2 * BLOCK] == pattern(2, BLOCK)[..]);
    let cut = bdev.cut_power_keep_none();
    assert!(
        cut[BLOCK..].iter().all(|&b| b == 0),
        "{context}: a cut can lose it"
    );
}

#[test]
fn a_flush_submitted_while_a_write_is_in_flight_does_not_make_it_durable() {
    let mut outcomes = (0, 0);
    for seed in 0..32 {
        let (bdev, desc) = crash_device();
        let device = Arc::clone(&bdev);
        let completed_first = sim(seed)
            .block_on(ReactorId(0), move || flush_racing_a_write(device, desc))
            .unwrap();
        if completed_first {
            outcomes.0 += 1;
        } else {
            outcomes.1 += 1;
        }
        check_flush_race(&bdev, &format!("seed {seed}"));
    }
    assert!(
        outcomes.0 > 0 && outcomes.1 > 0,
        "the write completed both before and after the flush across seeds: {outcomes:?}"
    );

    // On a real reactor completions are FIFO: the write completes just before the flush.
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let (bdev, desc) = crash_device();
    let device = Arc::clone(&bdev);
    let completed_first = runtime
        .block_on(ReactorId(0), move || flush_racing_a_write(device, desc))
        .unwrap();
    assert!(
        completed_first,
        "FIFO: the write completed before the flush"
    );
    check_flush_race(&bdev, "runtime");
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn requests_in_flight_at_a_cut_fail_with_eio_and_move_no_data() {
    let (bdev, desc) = crash_device();
    let device = Arc::clone(&bdev);
    sim(7)
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            channel
                .write(buf_of(&pattern(1, BLOCK)), 0)
                .await
                .0
                .unwrap();
            let writing = channel.write(buf_of(&pattern(2, BLOCK)), 0);
            let reading = channel.read(DmaBuf::alloc_zeroed(BLOCK).unwrap(), 0);
            // Requests are submitted when called; this poll only shows the flush is in flight.
            let mut flushing = std::pin::pin!(channel.flush());
            let mut context = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(flushing.as_mut().poll(&mut context).is_pending());
            let image = device.cut_power_keep_none();
            assert!(image.iter().all(|&b| b == 0), "nothing was flushed");
            assert_eq!(writing.await.0.unwrap_err().errno(), -libc::EIO);
            let (result, buf) = reading.await;
            assert_eq!(result.unwrap_err().errno(), -libc::EIO);
            assert!(buf.iter().all(|&b| b == 0), "the failed read moved no data");
            assert_eq!(flushing.await.unwrap_err().errno(), -libc::EIO);
            assert!(device.live_image().iter().all(|&b| b == 0));
            assert!(device.pending_writes().is_empty());
            // The device works again after the cut.
            channel
                .write(buf_of(&pattern(3, BLOCK)), 0)
                .await
                .0
                .unwrap();
            channel.flush().await.unwrap();
        })
        .unwrap();
    assert!(bdev.durable_image()[..BLOCK] == pattern(3, BLOCK)[..]);
}

#[test]
fn construction_checks_its_arguments() {
    assert!(CrashBdev::new("bad", 1000, 8).is_err());
    assert!(CrashBdev::new("bad", 4096, 0).is_err());
    assert!(CrashBdev::from_image("bad", 512, &[0; 700]).is_err());
    let image = pattern(4, 4 * BLOCK);
    let bdev = CrashBdev::from_image("ok", BLOCK as u32, &image).unwrap();
    assert_eq!(bdev.block_count(), 4);
    assert!(bdev.durable_image() == image && bdev.live_image() == image);
}
