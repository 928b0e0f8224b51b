//! Goal: the crash device's simulation hooks do exactly what the whole-engine simulation
//! relies on: `cut_power_with` lands torn writes block by block and applies survivors in
//! the order given (an older write over a newer one), `testing_flush_lies` makes a flush
//! durable-nothing, and latency spikes delay completions in virtual time only. Method: two
//! overlapping writes on a one-reactor simulation, then cuts with chosen survivors; the
//! images are compared byte for byte.

use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, CrashBdev, DmaBuf, Survivor};
use spool_reactor::{ReactorId, Sim, SimOptions};

const BLOCK: usize = 512;
const BLOCKS: u64 = 16;

fn filled(byte: u8, len: usize) -> DmaBuf {
    let mut buf = DmaBuf::alloc(len).unwrap();
    buf.fill(byte);
    buf
}

/// Writes 4 blocks of 0xAA at block 0, then 4 blocks of 0xBB at block 2 (completed in that
/// order), optionally flushing first; returns the device.
fn two_writes(flush_lies: bool, spikes: bool) -> (Arc<CrashBdev>, u64) {
    let bdev = Arc::new(CrashBdev::new("crash", BLOCK as u32, BLOCKS).unwrap());
    bdev.testing_flush_lies(flush_lies);
    if spikes {
        bdev.set_latency_spikes(1, 5_000_000);
    }
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let mut sim = Sim::new(SimOptions {
        seed: 1,
        reactors: 1,
    });
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        channel.write(filled(0xAA, 4 * BLOCK), 0).await.0.unwrap();
        channel
            .write(filled(0xBB, 4 * BLOCK), 2 * BLOCK as u64)
            .await
            .0
            .unwrap();
        if flush_lies {
            channel.flush().await.unwrap();
        }
    })
    .unwrap();
    let now = sim.now_ns();
    sim.stop();
    (bdev, now)
}

fn block(image: &[u8], n: usize) -> u8 {
    let bytes = &image[n * BLOCK..(n + 1) * BLOCK];
    assert!(bytes.iter().all(|&b| b == bytes[0]), "block {n} is whole");
    bytes[0]
}

#[test]
fn survivors_apply_in_the_order_given_so_an_older_write_can_win() {
    let (bdev, _) = two_writes(false, false);
    let pending = bdev.pending_writes();
    assert_eq!(pending.len(), 2);
    let (older, newer) = (pending[0].index, pending[1].index);
    let image = bdev.cut_power_with(&[
        Survivor {
            index: newer,
            blocks: None,
        },
        Survivor {
            index: older,
            blocks: None,
        },
    ]);
    let blocks: Vec<u8> = (0..7).map(|n| block(&image, n)).collect();
    assert_eq!(
        blocks,
        [0xAA, 0xAA, 0xAA, 0xAA, 0xBB, 0xBB, 0],
        "the older write, applied last, wins the overlap"
    );
    assert!(bdev.live_image() == image && bdev.durable_image() == image);
}

#[test]
fn a_torn_write_lands_only_the_blocks_named() {
    let (bdev, _) = two_writes(false, false);
    let pending = bdev.pending_writes();
    let image = bdev.cut_power_with(&[
        Survivor {
            index: pending[0].index,
            blocks: None,
        },
        Survivor {
            index: pending[1].index,
            // Block 1 of the write is device block 3; 9 is outside the write: ignored.
            blocks: Some(vec![1, 3, 9]),
        },
    ]);
    let blocks: Vec<u8> = (0..8).map(|n| block(&image, n)).collect();
    assert_eq!(blocks, [0xAA, 0xAA, 0xAA, 0xBB, 0, 0xBB, 0, 0]);
}

#[test]
fn a_lying_flush_makes_nothing_durable() {
    let (bdev, _) = two_writes(true, false);
    assert_eq!(
        bdev.pending_writes().len(),
        2,
        "the flush kept both pending"
    );
    assert!(bdev.cut_power_with(&[]).iter().all(|&b| b == 0));
    let (honest, _) = two_writes(false, false);
    assert_eq!(honest.pending_writes().len(), 2, "no flush issued");
}

#[test]
fn latency_spikes_delay_completions_in_virtual_time() {
    let (_, quick) = two_writes(false, false);
    let (_, spiked) = two_writes(false, true);
    assert!(
        quick < 1_000_000,
        "two writes take microseconds: {quick} ns"
    );
    assert!(
        spiked >= 10_000_000,
        "each write waited 5 ms more: {spiked} ns"
    );
}
