//! Unit tests of the uring poll group (`group.rs`, `channels.rs`, `request.rs`).

use super::*;
use crate::dma::DmaBuf;
use crate::io::{IoKind, IoSlots, Submission};
use crate::uring::bdev::DeviceShared;
use crate::uring::request::{fill_iovecs, Phase, Progress, SHORT_IO_RETRIES_MAX};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn entry_with(slots: Rc<IoSlots>, progress: Progress) -> ChannelEntry {
    let dev = Arc::new(DeviceShared {
        file: tempfile::tempfile().expect("tempfile"),
        path: "test".into(),
        block_device: false,
        unmap_fill: AtomicBool::new(false),
        zeroes_fill: AtomicBool::new(false),
        keep_allocated: false,
    });
    ChannelEntry {
        slots,
        dev,
        file: 0,
        in_flight: 0,
        overflow: VecDeque::new(),
        progress: vec![progress],
        zero_buf: None,
        open: true,
    }
}

fn shared(file: std::fs::File) -> Arc<DeviceShared> {
    Arc::new(DeviceShared {
        file,
        path: "test".into(),
        block_device: false,
        unmap_fill: AtomicBool::new(false),
        zeroes_fill: AtomicBool::new(false),
        keep_allocated: false,
    })
}

/// A 64 KiB temp file: the device to attach, and a handle to read it back.
fn test_device() -> (Arc<DeviceShared>, std::fs::File) {
    let file = tempfile::tempfile().expect("tempfile");
    file.set_len(65536).expect("set_len");
    let reader = file.try_clone().expect("clone");
    (shared(file), reader)
}

fn test_group() -> GroupState {
    let ring = Ring::new(&RingOptions {
        entries: 8,
        ..RingOptions::default()
    })
    .expect("ring");
    GroupState::new(ring, 8, 0)
}

/// Starts a 4 KiB write of `byte`s at `offset` on channel `index`.
fn start_write(
    group: &mut GroupState,
    index: u32,
    slots: &IoSlots,
    offset: u64,
    byte: u8,
) -> SlotId {
    let slot = slots.acquire(IoKind::Write, offset, 4096).expect("slot");
    slots.with(slot, |req| {
        let mut buf = DmaBuf::alloc(4096).expect("alloc");
        buf.fill(byte);
        req.bufs.push(buf);
    });
    group.start_request(index, Submission::new(slots, slot));
    slot
}

fn status(slots: &IoSlots, slot: SlotId) -> Option<i32> {
    slots.poll_done(slot, std::task::Waker::noop())
}

fn bytes_at(file: &std::fs::File, offset: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; 4096];
    file.read_exact_at(&mut out, offset).expect("read");
    out
}

/// Polls until `done` holds (bounded).
fn poll_until(group: &mut GroupState, mut done: impl FnMut(&GroupState) -> bool) {
    for _ in 0..100_000 {
        if done(group) {
            return;
        }
        group.poll();
        std::thread::yield_now();
    }
    panic!("condition never held");
}

fn file_slot(group: &GroupState, index: u32) -> Option<u32> {
    group.channels[index as usize]
        .as_ref()
        .map(|entry| entry.file)
}

#[test]
fn a_closed_channel_keeps_its_file_slot_until_its_queued_sqes_completed() {
    let mut group = test_group();
    let (dev_a, file_a) = test_device();
    let (dev_b, file_b) = test_device();
    let slots_a = Rc::new(IoSlots::new());
    let a = group.add_channel(dev_a, Rc::clone(&slots_a)).expect("a");
    let a_file = file_slot(&group, a).expect("a attached");
    let slot = start_write(&mut group, a, &slots_a, 0, 0xaa);
    assert_eq!(group.queued.len(), 1, "pushed, not submitted");
    // The request's future and its channel go away while the SQE is still queued.
    slots_a.abandon(slot);
    group.close_channel(a);
    assert_eq!(
        file_slot(&group, a),
        Some(a_file),
        "entry and file slot kept"
    );
    // Another bdev's channel must not get the closed channel's file slot.
    let slots_b = Rc::new(IoSlots::new());
    let b = group.add_channel(dev_b, Rc::clone(&slots_b)).expect("b");
    assert_ne!(file_slot(&group, b), Some(a_file));
    poll_until(&mut group, |g| g.channels[a as usize].is_none());
    assert_eq!(group.ring.in_flight(), 0);
    assert_eq!(
        bytes_at(&file_a, 0),
        vec![0xaa; 4096],
        "landed on its own file"
    );
    assert_eq!(
        bytes_at(&file_b, 0),
        vec![0; 4096],
        "not on the other bdev's file"
    );
    // Once drained, the slot is released and reused.
    let (dev_c, _file_c) = test_device();
    let c = group
        .add_channel(dev_c, Rc::new(IoSlots::new()))
        .expect("c");
    assert_eq!(file_slot(&group, c), Some(a_file));
}

#[test]
fn a_full_submit_batch_goes_to_the_kernel_at_once_and_the_rest_at_the_pass_end() {
    let ring = Ring::new(&RingOptions {
        entries: 8,
        ..RingOptions::default()
    })
    .expect("ring");
    let mut group = GroupState::new(ring, 8, 2);
    let (dev, file) = test_device();
    let slots = Rc::new(IoSlots::new());
    let a = group.add_channel(dev, Rc::clone(&slots)).expect("a");
    let first = start_write(&mut group, a, &slots, 0, 0x41);
    assert_eq!(group.queued.len(), 1, "one SQE waits for its batch");
    assert_eq!(group.stats().enters, 0);
    let second = start_write(&mut group, a, &slots, 4096, 0x42);
    assert!(group.queued.is_empty(), "a full batch is submitted at once");
    assert_eq!(group.stats().enters, 1);
    let third = start_write(&mut group, a, &slots, 8192, 0x43);
    assert_eq!(group.queued.len(), 1);
    // The poller submits the partial batch (one more enter) and reaps.
    poll_until(&mut group, |_| {
        [first, second, third]
            .iter()
            .all(|&slot| status(&slots, slot).is_some())
    });
    assert_eq!(group.stats().enters, 2);
    assert!(group.queued.is_empty());
    for (slot, offset, byte) in [(first, 0, 0x41), (second, 4096, 0x42), (third, 8192, 0x43)] {
        assert_eq!(status(&slots, slot), Some(0));
        assert_eq!(bytes_at(&file, offset), vec![byte; 4096]);
    }
}

#[test]
fn sqpoll_groups_forget_the_sqes_the_kernel_thread_took() {
    for submit_batch in [0, 4] {
        let ring = match Ring::new(&RingOptions {
            entries: 64,
            sqpoll_idle_ms: Some(10),
            sqpoll_cpu: None,
        }) {
            Ok(ring) => ring,
            Err(err) => {
                eprintln!("SQPOLL unavailable ({err}); skipping");
                return;
            }
        };
        let mut group = GroupState::new(ring, 64, submit_batch);
        let (dev, file) = test_device();
        let slots = Rc::new(IoSlots::new());
        let a = group.add_channel(dev, Rc::clone(&slots)).expect("a");
        let started: Vec<SlotId> = (0..16u8)
            .map(|i| start_write(&mut group, a, &slots, u64::from(i) * 4096, i + 1))
            .collect();
        poll_until(&mut group, |_| {
            started.iter().all(|&slot| status(&slots, slot).is_some())
        });
        // Once the kernel thread consumed everything, nothing is left to submit: the group
        // goes idle instead of re-submitting (and spinning) forever.
        poll_until(&mut group, |g| g.queued.is_empty());
        assert_eq!(group.poll(), PollStatus::Idle, "batch {submit_batch}");
        for i in 0..16u8 {
            assert_eq!(bytes_at(&file, u64::from(i) * 4096), vec![i + 1; 4096]);
        }
    }
}

#[test]
fn a_batch_submission_that_fails_waits_for_the_next_pass() {
    let ring = Ring::new(&RingOptions {
        entries: 8,
        ..RingOptions::default()
    })
    .expect("ring");
    let mut group = GroupState::new(ring, 8, 2);
    let (dev, _file) = test_device();
    let slots = Rc::new(IoSlots::new());
    let a = group.add_channel(dev, Rc::clone(&slots)).expect("a");
    // As after a failed or partial batch enter: further pushes do not enter again.
    group.batch_held = true;
    for i in 0..4u64 {
        start_write(&mut group, a, &slots, i * 4096, 7);
    }
    assert_eq!(group.stats().enters, 0, "held until the next pass");
    assert_eq!(group.queued.len(), 4);
    // The next pass lifts the hold and submits everything once.
    group.poll();
    assert!(!group.batch_held);
    assert!(group.queued.is_empty());
    assert_eq!(group.stats().enters, 1);
}

#[test]
fn a_closed_channel_with_nothing_in_flight_is_removed_at_once() {
    let mut group = test_group();
    let (dev, _file) = test_device();
    let a = group.add_channel(dev, Rc::new(IoSlots::new())).expect("a");
    let a_file = file_slot(&group, a).expect("attached");
    group.close_channel(a);
    assert!(group.channels[a as usize].is_none());
    assert_eq!(group.stats().channels, 0);
    let (dev, _file) = test_device();
    let b = group.add_channel(dev, Rc::new(IoSlots::new())).expect("b");
    assert_eq!(file_slot(&group, b), Some(a_file), "file slot released");
}

#[test]
fn a_retired_ring_fails_unsubmitted_requests_and_never_submits_them() {
    let mut group = test_group();
    let (dev, file) = test_device();
    let slots = Rc::new(IoSlots::new());
    let a = group.add_channel(dev, Rc::clone(&slots)).expect("a");
    // One write accepted by the kernel, then one pushed but not submitted.
    let accepted = start_write(&mut group, a, &slots, 0, 0x11);
    group.submit();
    assert!(group.queued.is_empty());
    let queued = start_write(&mut group, a, &slots, 4096, 0x22);
    assert_eq!(group.queued.len(), 1);
    // What `submit` does after ENTER_FAILURES_MAX failed enters in a row.
    group.fail_ring(-libc::ENXIO);
    assert_eq!(
        status(&slots, queued),
        Some(-libc::ENXIO),
        "failed, not hanging"
    );
    assert_eq!(group.stats().ring_error, -libc::ENXIO);
    assert!(group.queued.is_empty());
    // The accepted one still completes normally.
    poll_until(&mut group, |_| status(&slots, accepted).is_some());
    assert_eq!(status(&slots, accepted), Some(0));
    assert_eq!(group.ring.in_flight(), 0);
    // Later requests fail at once, delivered by the poller.
    let later = start_write(&mut group, a, &slots, 8192, 0x33);
    assert_eq!(group.poll(), PollStatus::Busy);
    assert_eq!(status(&slots, later), Some(-libc::ENXIO));
    for _ in 0..100 {
        group.poll();
    }
    assert_eq!(bytes_at(&file, 0), vec![0x11; 4096]);
    assert_eq!(
        bytes_at(&file, 4096),
        vec![0; 4096],
        "retracted SQE never ran"
    );
    assert_eq!(bytes_at(&file, 8192), vec![0; 4096]);
    assert_eq!(group.poll(), PollStatus::Idle);
}

#[test]
fn iovecs_skip_done_bytes_and_respect_the_cap() {
    let slots = IoSlots::new();
    let slot = slots.acquire(IoKind::Read, 0, 12288).expect("slot");
    slots.with(slot, |req| {
        for len in [6144, 2048, 4096] {
            req.bufs.push(DmaBuf::alloc(len).expect("alloc"));
        }
        assert_eq!(fill_iovecs(req, 0, u64::MAX), 12288);
        assert_eq!(req.iovecs.len(), 3);
        assert_eq!(fill_iovecs(req, 7000, u64::MAX), 12288 - 7000);
        assert_eq!(req.iovecs.len(), 2);
        assert_eq!(req.iovecs[0].iov_len, 8192 - 7000);
        let base = req.bufs[1].as_ptr() as usize;
        assert_eq!(req.iovecs[0].iov_base as usize, base + (7000 - 6144));
        assert_eq!(fill_iovecs(req, 1000, 6000), 6000);
        assert_eq!(req.iovecs.len(), 2);
        assert_eq!(req.iovecs[1].iov_len, 6000 - (6144 - 1000));
    });
}

#[test]
fn short_transfers_resume_and_stalls_fail_with_eio() {
    let mut stats = UringGroupStats::default();
    let rw = Progress {
        phase: Phase::Rw,
        write: false,
        done: 0,
        issued: 8192,
        total: 8192,
        shorts: 0,
    };
    let mut entry = entry_with(Rc::new(IoSlots::new()), rw);
    assert!(matches!(
        on_completion(&mut entry, 0, 4096, &mut stats),
        Outcome::Again
    ));
    assert_eq!(entry.progress[0].done, 4096);
    entry.progress[0].issued = 4096;
    assert!(matches!(
        on_completion(&mut entry, 0, 4096, &mut stats),
        Outcome::Done(0)
    ));
    assert_eq!(stats.short_resubmits, 1);
    // End of file: 0 bytes is an error, never a retry loop.
    entry.progress[0] = rw;
    assert!(matches!(
        on_completion(&mut entry, 0, 0, &mut stats),
        Outcome::Done(e) if e == -libc::EIO
    ));
    // Endless short transfers give up after SHORT_IO_RETRIES_MAX.
    entry.progress[0] = Progress {
        total: 1 << 20,
        issued: 1 << 20,
        ..rw
    };
    let mut outcomes = 0;
    while let Outcome::Again = on_completion(&mut entry, 0, 512, &mut stats) {
        outcomes += 1;
    }
    assert_eq!(outcomes, usize::from(SHORT_IO_RETRIES_MAX));
    entry.progress[0] = rw;
    assert!(matches!(
        on_completion(&mut entry, 0, -libc::EIO, &mut stats),
        Outcome::Done(e) if e == -libc::EIO
    ));
}

#[test]
fn refused_fallocate_switches_to_zero_fill_and_remembers() {
    let mut stats = UringGroupStats::default();
    let punch = Progress {
        phase: Phase::Punch,
        total: 8192,
        ..Progress::default()
    };
    let mut entry = entry_with(Rc::new(IoSlots::new()), punch);
    assert!(matches!(
        on_completion(&mut entry, 0, -libc::EOPNOTSUPP, &mut stats),
        Outcome::Again
    ));
    assert_eq!(entry.progress[0].phase, Phase::ZeroFill);
    assert!(entry.dev.unmap_fill.load(Ordering::Relaxed));
    assert!(!entry.dev.zeroes_fill.load(Ordering::Relaxed));
    // Other errors are reported as they are.
    entry.progress[0] = Progress {
        phase: Phase::ZeroRange,
        ..punch
    };
    assert!(matches!(
        on_completion(&mut entry, 0, -libc::EIO, &mut stats),
        Outcome::Done(e) if e == -libc::EIO
    ));
}

/// Two 4 KiB DMA buffers adjacent in memory: the first, and the one right after it.
fn adjacent_bufs() -> (DmaBuf, DmaBuf) {
    let mut bufs: Vec<DmaBuf> = (0..64)
        .map(|_| DmaBuf::alloc(4096).expect("alloc"))
        .collect();
    bufs.sort_by_key(|buf| buf.as_ptr() as usize);
    let at = (0..bufs.len() - 1)
        .find(|&i| bufs[i].as_ptr() as usize + 4096 == bufs[i + 1].as_ptr() as usize)
        .expect("two adjacent 4 KiB buffers among 64");
    let next = bufs.remove(at + 1);
    (bufs.remove(at), next)
}

#[test]
fn a_request_longer_than_its_buffer_fails_with_einval_and_is_never_issued() {
    let mut group = test_group();
    let (dev, file) = test_device();
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[0xee; 16384], 0).expect("fill");
    }
    let slots = Rc::new(IoSlots::new());
    let index = group.add_channel(dev, Rc::clone(&slots)).expect("attach");
    let (buf, mut next) = adjacent_bufs();
    next.fill(0x5a);
    // A 16 KiB read into a 4 KiB buffer (what a wrapper bdev could ask for when the request's
    // length was a public field).
    let slot = slots.acquire(IoKind::Read, 0, 16384).expect("slot");
    slots.with(slot, |req| req.bufs.push(buf));
    group.start_request(index, Submission::new(&slots, slot));
    poll_until(&mut group, |_| status(&slots, slot).is_some());
    assert!(
        next.iter().all(|&b| b == 0x5a),
        "the kernel wrote past the request's buffer into the next DMA buffer"
    );
    assert_eq!(status(&slots, slot), Some(-libc::EINVAL));
    assert_eq!(group.stats().sqes_pushed, 0, "never issued");
}

#[test]
fn a_stale_cqe_never_completes_the_reused_slot() {
    let mut group = test_group();
    let (dev, _file) = test_device();
    let slots = Rc::new(IoSlots::new());
    let index = group.add_channel(dev, Rc::clone(&slots)).expect("attach");
    // A flush is pushed (its SQE names no memory), then its slot is completed and reused
    // before the SQE's CQE arrives: what safe code could do when completion was public.
    let old = slots.acquire(IoKind::Flush, 0, 0).expect("slot");
    group.start_request(index, Submission::new(&slots, old));
    slots.complete(old, 0);
    assert_eq!(status(&slots, old), Some(0));
    slots.release(old, |_| ());
    let new = slots.acquire(IoKind::Flush, 0, 0).expect("slot");
    group.start_request(index, Submission::new(&slots, new));
    assert_eq!(group.queued.len(), 2, "both SQEs queued");
    // The old CQE is reaped first: ignored (the old code completed `new` with it, then
    // panicked with "completed twice" at `new`'s own CQE).
    poll_until(&mut group, |group| group.ring.in_flight() == 0);
    assert_eq!(status(&slots, new), Some(0));
    assert_eq!(group.stats().completions, 2);
    slots.release(new, |_| ());
    assert_eq!(slots.in_flight(), 0);
}
