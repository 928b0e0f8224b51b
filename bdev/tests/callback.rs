//! Goal: callback requests (`BdevChannel::read_with` / `write_with`) call their callback
//! exactly once, from the poller, with the request's status, its own buffer and its tag, and
//! only once the device is done with the buffer; refused requests are never called back; a
//! channel dropped with requests in flight still calls each back (with -ECANCELED); a panic in
//! a callback is contained and the channel and reactor go on. Method: a recording callback
//! over the null, malloc and error devices, under simulation and on a real reactor.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use spool_bdev::{
    Bdev, BdevChannel, BdevDesc, DmaBuf, ErrorBdev, ErrorRule, IoCallback, IoDone, IoKind,
    MallocBdev, NullBdev,
};
use spool_reactor::{IdleMode, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions};

const BLOCK: u64 = 4096;

/// One call of the recording callback.
#[derive(Debug)]
struct Call {
    tag: u64,
    /// 0 or the errno.
    errno: i32,
    buf: DmaBuf,
    kind: IoKind,
    /// The channel's requests in flight when the callback ran (if it was given the channel).
    in_flight: Option<usize>,
}

/// Records every call; wakes whoever waits for a number of calls. Panics on the tags in
/// `panic_on` (after recording the call).
#[derive(Default)]
struct Recorder {
    calls: RefCell<Vec<Call>>,
    waiter: RefCell<Option<Waker>>,
    channel: RefCell<Option<BdevChannel>>,
    panic_on: Vec<u64>,
    /// Set while a submission call runs: a callback must never run inside one.
    submitting: Cell<bool>,
}

impl Recorder {
    fn with_panics(panic_on: Vec<u64>) -> Rc<Recorder> {
        Rc::new(Recorder {
            panic_on,
            ..Recorder::default()
        })
    }

    fn count(&self) -> usize {
        self.calls.borrow().len()
    }

    /// Waits until `n` calls were recorded.
    async fn wait_for(&self, n: usize) {
        poll_fn(|cx| {
            if self.count() >= n {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Calls of `tag`.
    fn calls_of(&self, tag: u64) -> usize {
        self.calls
            .borrow()
            .iter()
            .filter(|call| call.tag == tag)
            .count()
    }
}

impl IoCallback for Recorder {
    fn io_done(self: Rc<Self>, done: IoDone) {
        assert!(
            !self.submitting.get(),
            "a callback ran inside the submission call"
        );
        let in_flight = self.channel.borrow().as_ref().map(BdevChannel::in_flight);
        assert_eq!(
            done.errno(),
            done.result().map_or_else(|err| err.errno(), |()| 0),
            "errno() and result() agree"
        );
        self.calls.borrow_mut().push(Call {
            tag: done.tag,
            errno: done.result().map_or_else(|err| err.errno(), |()| 0),
            kind: done.kind(),
            buf: done.buf,
            in_flight,
        });
        if let Some(waiter) = self.waiter.borrow_mut().take() {
            waiter.wake();
        }
        if self.panic_on.contains(&done.tag) {
            panic!("callback for tag {} panics (on purpose)", done.tag);
        }
    }
}

/// Submits a read through `recorder`, checking no callback runs inside the call.
fn read_with(
    channel: &BdevChannel,
    recorder: &Rc<Recorder>,
    buf: DmaBuf,
    offset: u64,
    tag: u64,
) -> Result<(), spool_bdev::Refused> {
    recorder.submitting.set(true);
    let result = channel.read_with(buf, offset, Rc::clone(recorder) as Rc<dyn IoCallback>, tag);
    recorder.submitting.set(false);
    result
}

fn sim(seed: u64) -> Sim {
    Sim::new(SimOptions { seed, reactors: 1 })
}

fn null_desc() -> BdevDesc {
    BdevDesc::open(Arc::new(
        NullBdev::new("null0", BLOCK as u32, 1 << 16).unwrap(),
    ))
    .expect("open bdev")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(37).wrapping_add((i % 253) as u8) | 1)
        .collect()
}

#[test]
fn each_callback_runs_once_with_its_status_buffer_and_tag_after_the_slot_is_free() {
    let mut sim = sim(11);
    let desc = null_desc();
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let recorder = Recorder::with_panics(Vec::new());
        *recorder.channel.borrow_mut() = Some(channel.clone());
        let mut addresses = Vec::new();
        for tag in 0..16u64 {
            let buf = DmaBuf::alloc(4096 * (1 + tag as usize % 3)).unwrap();
            addresses.push((buf.as_ptr() as usize, buf.len()));
            read_with(&channel, &recorder, buf, tag * BLOCK * 4, tag).unwrap();
        }
        assert_eq!(recorder.count(), 0, "nothing is called back at submission");
        assert_eq!(channel.in_flight(), 16);
        recorder.wait_for(16).await;
        // A few more passes: no second call for anyone.
        for _ in 0..10 {
            spool_reactor::yield_now().await;
        }
        let calls = recorder.calls.take();
        assert_eq!(calls.len(), 16);
        for tag in 0..16u64 {
            let call: Vec<&Call> = calls.iter().filter(|call| call.tag == tag).collect();
            assert_eq!(call.len(), 1, "tag {tag} called back exactly once");
            let call = call[0];
            assert_eq!(call.errno, 0, "tag {tag} succeeded");
            assert_eq!(
                (call.buf.as_ptr() as usize, call.buf.len()),
                addresses[tag as usize],
                "tag {tag} got its own buffer back"
            );
            assert!(
                call.in_flight.unwrap() < 16,
                "the slot is freed before the callback gets the buffer"
            );
        }
        assert_eq!(channel.in_flight(), 0);
        recorder.channel.borrow_mut().take();
    })
    .unwrap();
}

/// Chains `left` writes-then-reads at depth 1 from inside its own callback.
struct Chain {
    channel: BdevChannel,
    left: Cell<u32>,
    done: Cell<bool>,
    mismatches: Cell<u32>,
    waiter: RefCell<Option<Waker>>,
}

impl IoCallback for Chain {
    fn io_done(self: Rc<Self>, done: IoDone) {
        done.result().unwrap();
        let round = done.tag / 2;
        let offset = (round % 32) * BLOCK;
        if done.tag.is_multiple_of(2) {
            // The write of this round completed: read it back into the same buffer.
            let mut buf = done.buf;
            buf.fill(0);
            let this = Rc::clone(&self) as Rc<dyn IoCallback>;
            self.channel
                .read_with(buf, offset, this, done.tag + 1)
                .unwrap();
            return;
        }
        if done.buf[..] != pattern(round as u8, BLOCK as usize)[..] {
            self.mismatches.set(self.mismatches.get() + 1);
        }
        let left = self.left.get() - 1;
        self.left.set(left);
        if left == 0 {
            self.done.set(true);
            if let Some(waiter) = self.waiter.borrow_mut().take() {
                waiter.wake();
            }
            return;
        }
        let next = round + 1;
        let mut buf = done.buf;
        buf.copy_from_slice(&pattern(next as u8, BLOCK as usize));
        let this = Rc::clone(&self) as Rc<dyn IoCallback>;
        self.channel
            .write_with(buf, (next % 32) * BLOCK, this, next * 2)
            .unwrap();
    }
}

#[test]
fn a_callback_may_submit_the_next_request_and_data_round_trips_through_malloc() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let desc = BdevDesc::open(Arc::new(
        MallocBdev::new("malloc0", BLOCK as u32, 64).unwrap(),
    ))
    .expect("open bdev");
    let (mismatches, in_flight) = runtime
        .block_on(ReactorId(0), move || async move {
            let chain = Rc::new(Chain {
                channel: desc.channel().unwrap(),
                left: Cell::new(500),
                done: Cell::new(false),
                mismatches: Cell::new(0),
                waiter: RefCell::new(None),
            });
            let mut buf = DmaBuf::alloc(BLOCK as usize).unwrap();
            buf.copy_from_slice(&pattern(0, BLOCK as usize));
            let this = Rc::clone(&chain) as Rc<dyn IoCallback>;
            chain.channel.write_with(buf, 0, this, 0).unwrap();
            poll_fn(|cx| {
                if chain.done.get() {
                    Poll::Ready(())
                } else {
                    *chain.waiter.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            (chain.mismatches.get(), chain.channel.in_flight())
        })
        .unwrap();
    assert_eq!(mismatches, 0, "every read saw the write before it");
    assert_eq!(in_flight, 0);
    let stopped = runtime.stop();
    assert_eq!(stopped.leaked_channels, 0);
    assert!(stopped.panicked.is_empty());
}

#[test]
fn a_device_error_reaches_the_callback_and_a_refused_request_is_never_called_back() {
    let mut sim = sim(12);
    let inner = Arc::new(MallocBdev::new("malloc0", BLOCK as u32, 64).unwrap());
    let error = Arc::new(ErrorBdev::new("error0", inner as Arc<dyn Bdev>));
    error.add_rule(
        ErrorRule::new(-libc::EIO)
            .kinds(&[IoKind::Read])
            .range_blocks(8..9),
    );
    let desc = BdevDesc::open(Arc::clone(&error) as Arc<dyn Bdev>).unwrap();
    sim.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let recorder = Recorder::with_panics(Vec::new());
        let failing = DmaBuf::alloc(4096).unwrap();
        let failing_address = failing.as_ptr() as usize;
        read_with(&channel, &recorder, failing, 8 * BLOCK, 1).unwrap();
        read_with(&channel, &recorder, DmaBuf::alloc(4096).unwrap(), 0, 2).unwrap();
        // Refused: misaligned, past the end. The error and the buffer come back at once.
        let refused =
            read_with(&channel, &recorder, DmaBuf::alloc(4096).unwrap(), 512, 3).unwrap_err();
        assert_eq!(refused.error.errno(), -libc::EINVAL);
        assert_eq!(refused.buf.len(), 4096);
        let refused = read_with(
            &channel,
            &recorder,
            DmaBuf::alloc(4096).unwrap(),
            64 * BLOCK,
            4,
        )
        .unwrap_err();
        assert_eq!(refused.error.errno(), -libc::EINVAL);
        recorder.wait_for(2).await;
        for _ in 0..10 {
            spool_reactor::yield_now().await;
        }
        let calls = recorder.calls.take();
        assert_eq!(calls.len(), 2, "refused requests are never called back");
        let failed = calls.iter().find(|call| call.tag == 1).unwrap();
        assert_eq!(failed.errno, -libc::EIO, "the device's errno");
        assert_eq!(failed.kind, IoKind::Read);
        assert_eq!(failed.buf.as_ptr() as usize, failing_address);
        let ok = calls.iter().find(|call| call.tag == 2).unwrap();
        assert_eq!(ok.errno, 0);
        assert_eq!(channel.in_flight(), 0);
    })
    .unwrap();
    assert_eq!(error.injected_count(), 1);
}

#[test]
fn a_channel_dropped_with_requests_in_flight_calls_each_back_once_with_ecanceled() {
    let mut sim = sim(13);
    let null = null_desc();
    let malloc = BdevDesc::open(Arc::new(
        MallocBdev::new("malloc1", BLOCK as u32, 64).unwrap(),
    ))
    .unwrap();
    sim.block_on(ReactorId(0), move || async move {
        for desc in [null, malloc] {
            let channel = desc.private_channel().unwrap();
            let recorder = Recorder::with_panics(Vec::new());
            let mut addresses = Vec::new();
            for tag in 0..5u64 {
                let buf = DmaBuf::alloc(4096).unwrap();
                addresses.push(buf.as_ptr() as usize);
                read_with(&channel, &recorder, buf, tag * BLOCK, tag).unwrap();
            }
            assert_eq!(recorder.count(), 0);
            drop(channel);
            // The channel's table is gone: every callback ran, once, before the drop returned.
            let calls = recorder.calls.take();
            assert_eq!(calls.len(), 5, "{}: every request called back", desc.name());
            for tag in 0..5u64 {
                assert_eq!(recorder_calls(&calls, tag), 1, "tag {tag} once");
                let call = calls.iter().find(|call| call.tag == tag).unwrap();
                assert_eq!(call.errno, -libc::ECANCELED, "{}: tag {tag}", desc.name());
                assert_eq!(call.buf.as_ptr() as usize, addresses[tag as usize]);
            }
            // Nothing is called again later.
            for _ in 0..10 {
                spool_reactor::yield_now().await;
            }
            assert_eq!(recorder.count(), 0);
        }
    })
    .unwrap();
}

fn recorder_calls(calls: &[Call], tag: u64) -> usize {
    calls.iter().filter(|call| call.tag == tag).count()
}

#[test]
fn a_panicking_callback_is_contained_and_the_channel_and_reactor_go_on() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let desc = null_desc();
    let counts = runtime
        .spawn_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let recorder = Recorder::with_panics(vec![0, 5]);
            // Tags 0 and 1 complete in the same poller pass: 0 panics, 1 is still called.
            read_with(&channel, &recorder, DmaBuf::alloc(4096).unwrap(), 0, 0).unwrap();
            read_with(&channel, &recorder, DmaBuf::alloc(4096).unwrap(), BLOCK, 1).unwrap();
            recorder.wait_for(2).await;
            // The channel's poller was not unregistered: later requests complete.
            for tag in 2..10u64 {
                read_with(&channel, &recorder, DmaBuf::alloc(4096).unwrap(), 0, tag).unwrap();
                recorder.wait_for(tag as usize + 1).await;
            }
            // And a future on the same channel still works.
            let (result, _buf) = channel.read(DmaBuf::alloc(4096).unwrap(), 0).await;
            result.unwrap();
            let counts: Vec<usize> = (0..10).map(|tag| recorder.calls_of(tag)).collect();
            (counts, channel.in_flight())
        })
        .unwrap()
        .wait_timeout(std::time::Duration::from_secs(20));
    let Some(counts) = counts else {
        std::mem::forget(runtime);
        panic!("the channel stopped completing after the panic (its poller was unregistered?)");
    };
    let counts = counts.unwrap();
    assert_eq!(counts.0, vec![1; 10], "every tag called back exactly once");
    assert_eq!(counts.1, 0);
    // The reactor is still serving work.
    assert_eq!(runtime.block_on(ReactorId(0), || async { 7 }).unwrap(), 7);
    let stopped = runtime.stop();
    assert!(stopped.panicked.is_empty(), "the reactor thread never died");
    assert_eq!(stopped.leaked_channels, 0);
}

#[test]
fn uring_callbacks_come_from_the_group_poller_with_the_data_and_survive_a_dropped_channel() {
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).expect("tempfile");
    file.as_file().set_len(1 << 20).expect("set_len");
    let bdev = Arc::new(
        spool_bdev::UringBdev::open(file.path(), &spool_bdev::UringOptions::default())
            .expect("open uring bdev"),
    );
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Adaptive,
        pin: false,
    })
    .unwrap();
    let (read_back, dropped) = runtime
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let recorder = Recorder::with_panics(Vec::new());
            for tag in 0..8u64 {
                let mut buf = DmaBuf::alloc(BLOCK as usize).unwrap();
                buf.copy_from_slice(&pattern(tag as u8, BLOCK as usize));
                recorder.submitting.set(true);
                channel
                    .write_with(
                        buf,
                        tag * BLOCK,
                        Rc::clone(&recorder) as Rc<dyn IoCallback>,
                        tag,
                    )
                    .unwrap();
                recorder.submitting.set(false);
            }
            recorder.wait_for(8).await;
            assert!(recorder
                .calls
                .borrow()
                .iter()
                .all(|call| call.errno == 0 && call.kind == IoKind::Write));
            for tag in 0..8u64 {
                read_with(
                    &channel,
                    &recorder,
                    DmaBuf::alloc(BLOCK as usize).unwrap(),
                    tag * BLOCK,
                    100 + tag,
                )
                .unwrap();
            }
            recorder.wait_for(16).await;
            let calls = recorder.calls.take();
            let read_back: Vec<bool> = (0..8u64)
                .map(|tag| {
                    let call = calls.iter().find(|call| call.tag == 100 + tag).unwrap();
                    call.errno == 0
                        && call.kind == IoKind::Read
                        && call.buf[..] == pattern(tag as u8, BLOCK as usize)[..]
                })
                .collect();
            // A private channel dropped with reads in the kernel: each is still called back
            // once (success if its CQE finished it, else -ECANCELED), by the group poller.
            let private = desc.private_channel().unwrap();
            let dropped = Recorder::with_panics(Vec::new());
            for tag in 0..4u64 {
                read_with(
                    &private,
                    &dropped,
                    DmaBuf::alloc(BLOCK as usize).unwrap(),
                    tag * BLOCK,
                    tag,
                )
                .unwrap();
            }
            drop(private);
            dropped.wait_for(4).await;
            for _ in 0..20 {
                spool_reactor::yield_now().await;
            }
            let dropped: Vec<(usize, i32)> = (0..4u64)
                .map(|tag| {
                    let calls = dropped.calls.borrow();
                    let call = calls.iter().find(|call| call.tag == tag).unwrap();
                    (dropped.calls_of(tag), call.errno)
                })
                .collect();
            (read_back, dropped)
        })
        .unwrap();
    assert_eq!(
        read_back,
        vec![true; 8],
        "each read returned what was written"
    );
    for (tag, (count, errno)) in dropped.iter().enumerate() {
        assert_eq!(*count, 1, "tag {tag} called back once");
        assert!(
            *errno == 0 || *errno == -libc::ECANCELED,
            "tag {tag}: errno {errno}"
        );
    }
    let stopped = runtime.stop();
    assert!(stopped.panicked.is_empty());
}

/// A device whose every request fails inside `submit` (a safe outside backend).
struct FailsAtOnce;

struct FailsAtOnceChannel;

impl spool_bdev::ChannelBackend for FailsAtOnceChannel {
    fn submit(&mut self, io: spool_bdev::Submission<'_>) {
        io.complete(-libc::EIO);
    }

    fn poll(&mut self) -> spool_reactor::PollStatus {
        spool_reactor::PollStatus::Idle
    }
}

impl Bdev for FailsAtOnce {
    fn name(&self) -> &str {
        "fails-at-once"
    }

    fn block_size(&self) -> u32 {
        BLOCK as u32
    }

    fn block_count(&self) -> u64 {
        16
    }

    fn create_channel(
        &self,
        _slots: Rc<spool_bdev::IoSlots>,
    ) -> Result<Box<dyn spool_bdev::ChannelBackend>, spool_bdev::BdevError> {
        Ok(Box::new(FailsAtOnceChannel))
    }
}

/// Retries its read on every failure until told to stop.
struct Retrier {
    channel: BdevChannel,
    stop: Rc<Cell<bool>>,
    tries: Cell<u64>,
    stopped: Rc<Cell<bool>>,
}

impl IoCallback for Retrier {
    fn io_done(self: Rc<Self>, done: IoDone) {
        assert_eq!(done.errno(), -libc::EIO);
        self.tries.set(self.tries.get() + 1);
        if self.stop.get() {
            self.stopped.set(true);
            return;
        }
        let this = Rc::clone(&self) as Rc<dyn IoCallback>;
        self.channel.read_with(done.buf, 0, this, 0).unwrap();
    }
}

#[test]
fn a_callback_retrying_a_failure_that_completes_at_once_does_not_hold_the_reactor() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let desc = BdevDesc::open(Arc::new(FailsAtOnce) as Arc<dyn Bdev>).unwrap();
    let stopped = runtime
        .spawn_on(ReactorId(0), move || async move {
            let stop = Rc::new(Cell::new(false));
            let stopped = Rc::new(Cell::new(false));
            let retrier = Rc::new(Retrier {
                channel: desc.channel().unwrap(),
                stop: Rc::clone(&stop),
                tries: Cell::new(0),
                stopped: Rc::clone(&stopped),
            });
            let this = Rc::clone(&retrier) as Rc<dyn IoCallback>;
            retrier
                .channel
                .read_with(DmaBuf::alloc(4096).unwrap(), 0, this, 0)
                .unwrap();
            // The retries run one per poller pass, so this task still gets its turn.
            for _ in 0..20 {
                spool_reactor::yield_now().await;
            }
            stop.set(true);
            while !stopped.get() {
                spool_reactor::yield_now().await;
            }
            (retrier.tries.get(), retrier.channel.in_flight())
        })
        .unwrap()
        .wait_timeout(std::time::Duration::from_secs(20));
    let Some(stopped) = stopped else {
        // The reactor is stuck: leave it (stopping it would wait forever) and fail.
        std::mem::forget(runtime);
        panic!("the retrying callback held the reactor");
    };
    let (tries, in_flight) = stopped.unwrap();
    assert!(tries >= 2, "the callback retried ({tries} tries)");
    assert_eq!(in_flight, 0);
    assert!(runtime.stop().panicked.is_empty());
}
