//! Review of issue 15 (a sound bdev API): safe code outside the crate trying to break the
//! guarantees `docs/bdev.md` ("Soundness") states. Each test asserts a stated guarantee and
//! fails where safe code breaks it. None of them shows the kernel touching memory a live
//! request does not own; they show requests that hang forever, a request reported successful
//! that did not finish, a whole reactor's io_uring group stopping for good, a slot and buffer
//! leaked by a panicking backend, and a panic on an unchecked device geometry.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use spool_bdev::{
    Bdev, BdevChannel, BdevDesc, BdevError, ChannelBackend, CrashBdev, DmaBuf, ErrorBdev,
    ErrorRule, IoSlots, MallocBdev, NullBdev, Submission, UringBdev, UringOptions,
};
use spool_reactor::{IdleMode, PollStatus, ReactorId, Runtime, RuntimeOptions};

fn runtime() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .expect("runtime")
}

fn filled(len: usize, byte: u8) -> DmaBuf {
    let mut buf = DmaBuf::alloc(len).expect("alloc");
    buf.fill(byte);
    buf
}

fn temp_file(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).expect("tempfile");
    file.as_file().set_len(len).expect("set_len");
    file
}

/// `fut`'s output, or None if it is still pending after `limit` of reactor time.
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut sleep = pin!(spool_reactor::sleep(limit));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// What the wrapper's channel does with each submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards it.
    Forward,
    /// `std::mem::forget`s it (safe code).
    Forget,
    /// Forwards it, then drops the inner channel (and fails later submissions).
    ForwardThenDropInner,
    /// Panics (say, a `todo!()` for a kind it does not handle yet) without touching it.
    Panic,
}

struct Wrapper {
    name: String,
    inner: Arc<dyn Bdev>,
    mode: Mode,
}

impl Bdev for Wrapper {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn iov_len_align(&self) -> u32 {
        self.inner.iov_len_align()
    }
    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(WrapperChannel {
            inner: Some(self.inner.create_channel(slots)?),
            mode: self.mode,
        }))
    }
}

struct WrapperChannel {
    inner: Option<Box<dyn ChannelBackend>>,
    mode: Mode,
}

impl ChannelBackend for WrapperChannel {
    fn submit(&mut self, io: Submission<'_>) {
        let Some(inner) = self.inner.as_mut() else {
            io.complete(-libc::ENODEV);
            return;
        };
        match self.mode {
            Mode::Forward => inner.submit(io),
            Mode::Forget => std::mem::forget(io),
            Mode::ForwardThenDropInner => {
                inner.submit(io);
                self.inner = None;
            }
            Mode::Panic => todo!("{:?} is not handled yet", io.kind()),
        }
    }

    fn poll(&mut self) -> PollStatus {
        self.inner
            .as_mut()
            .map_or(PollStatus::Idle, |inner| inner.poll())
    }
}

fn wrap(inner: Arc<dyn Bdev>, mode: Mode) -> BdevDesc {
    BdevDesc::open(Arc::new(Wrapper {
        name: format!("review15-{mode:?}"),
        inner,
        mode,
    }))
    .expect("open bdev")
}

/// docs/bdev.md: "Dropping it completes the request with -ECANCELED, so nothing hangs." But
/// `std::mem::forget` is safe: a forgotten submission is never completed, its future never
/// resolves, and its slot (with the caller's buffer) is held forever.
#[test]
fn a_forgotten_submission_never_hangs_its_request() {
    let rt = runtime();
    let desc = wrap(
        Arc::new(MallocBdev::new("m-forget", 4096, 16).expect("malloc")),
        Mode::Forget,
    );
    let outcome = rt
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().expect("channel");
            let done = within(Duration::from_millis(500), channel.read(filled(4096, 1), 0)).await;
            (
                done.map(|(r, _)| r.map_err(|e| e.errno())),
                channel.in_flight(),
            )
        })
        .expect("reactor");
    assert!(
        outcome.0.is_some(),
        "a forgotten submission left its request hanging forever (in_flight = {})",
        outcome.1
    );
}

/// docs/bdev.md: "A wrapper that does otherwise gets errors (-EINVAL, -ECANCELED) for its own
/// requests", "so nothing hangs". A wrapper that drops (or replaces) the inner memory
/// device's channel while a request is queued there: the request is never completed.
#[test]
fn a_wrapper_dropping_its_inner_malloc_channel_never_hangs_a_request() {
    let rt = runtime();
    let desc = wrap(
        Arc::new(MallocBdev::new("m-drop-inner", 4096, 16).expect("malloc")),
        Mode::ForwardThenDropInner,
    );
    let outcome = rt
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().expect("channel");
            let done = within(Duration::from_millis(500), channel.read(filled(4096, 1), 0)).await;
            (
                done.map(|(r, _)| r.map_err(|e| e.errno())),
                channel.in_flight(),
            )
        })
        .expect("reactor");
    assert!(
        outcome.0.is_some(),
        "the request queued in the dropped inner channel hangs forever (in_flight = {})",
        outcome.1
    );
}

/// A wrapper that drops its inner uring channel after forwarding a read gets *success* for a
/// read that did not finish. The file shrank under the bdev (geometry is fixed at open), so
/// an 8 KiB read at 0 is short (4 KiB, then 0 bytes): through a well-behaved channel it fails
/// with -EIO; through the wrapper, the closed channel's entry completes the slot with
/// `result.min(0)` = 0 at the first (short) CQE, and the caller sees Ok for a read of which
/// only 4 KiB was transferred (the same holds for any multi-step request: a short write, a
/// read or write over 1 GiB, a zero-fill unmap). A wrong success is worse than the errors
/// docs/bdev.md promises such a wrapper.
#[test]
fn a_wrapper_dropping_its_inner_uring_channel_never_gets_success_for_an_unfinished_read() {
    let rt = runtime();
    let file = temp_file(1 << 20);
    let inner: Arc<dyn Bdev> =
        Arc::new(UringBdev::open(file.path(), &UringOptions::default()).expect("open"));
    // Now only the first block exists.
    file.as_file().set_len(4096).expect("truncate");
    let control = wrap(Arc::clone(&inner), Mode::Forward);
    let dropper = wrap(inner, Mode::ForwardThenDropInner);
    let (control_result, dropper_result) = rt
        .block_on(ReactorId(0), move || async move {
            let control = control.channel().expect("channel");
            let (r, _) = control.read(filled(8192, 0xaa), 0).await;
            let control_result = r.map_err(|e| e.errno());
            let dropper = dropper.channel().expect("channel");
            let (r, buf) = dropper.read(filled(8192, 0xaa), 0).await;
            drop(buf);
            (control_result, r.map_err(|e| e.errno()))
        })
        .expect("reactor");
    assert_eq!(
        control_result,
        Err(-libc::EIO),
        "the well-behaved channel fails the short read"
    );
    assert!(
        dropper_result.is_err(),
        "the wrapper's unfinished read (4 KiB of 8 KiB transferred) reported {dropper_result:?}"
    );
}

/// A backend whose `submit` panics: the panic is contained with the task, the submission is
/// dropped while unwinding (so the request completes with -ECANCELED), but no `IoFuture` was
/// made yet (`BdevChannel::start` makes it after `submit` returns), so nobody ever releases
/// the slot: it stays taken, with the caller's buffer parked in it, for the channel's life.
/// Every such panic leaks one of the channel's CHANNEL_IO_MAX (4096) slots and a buffer; after
/// that the channel fails every request with QueueFull.
#[test]
fn a_panicking_submit_never_leaks_the_slot_or_the_buffer() {
    let rt = runtime();
    let desc = wrap(
        Arc::new(MallocBdev::new("m-panic", 4096, 16).expect("malloc")),
        Mode::Panic,
    );
    let (panicked, in_flight) = rt
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().expect("channel");
            let task_channel = channel.clone();
            let task = spool_reactor::spawn_local(async move {
                let (r, _) = task_channel.read(filled(4096, 1), 0).await;
                r.is_ok()
            });
            // The panicking task is contained; give the reactor a few passes.
            let finished = within(Duration::from_millis(200), task).await;
            spool_reactor::sleep(Duration::from_millis(20)).await;
            (matches!(finished, Some(Err(_))), channel.in_flight())
        })
        .expect("reactor");
    assert!(panicked, "the task did not panic");
    assert_eq!(
        in_flight, 0,
        "after a panicking submit, the slot stays taken (its buffer parked in it) for good"
    );
}

thread_local! {
    static WATCHED: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
}

/// A waker that, when woken, reads a channel's `in_flight()` (say, for metrics), then wakes
/// the task. Plain safe code: `Wake` is a safe trait and `in_flight` a public `&self` method.
struct MetricsWaker {
    task: Waker,
}

impl Wake for MetricsWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        WATCHED.with(|watched| {
            if let Some(channel) = watched.borrow().as_ref() {
                let _ = channel.in_flight();
            }
        });
        self.task.wake_by_ref();
    }
}

/// io.rs says of waking a request's waiter from `complete`: "Waking only queues the task; it
/// cannot re-enter this table." Safe code can hand a request any waker (by polling the
/// `IoFuture` with its own `Context`), and the waker runs while the slot table is mutably
/// borrowed. A waker that reads `BdevChannel::in_flight()` panics the reactor's io_uring group
/// poller (RefCell already mutably borrowed); the reactor contains the panic by unregistering
/// that poller, and from then on no CQE of any uring bdev on that reactor is ever reaped:
/// a well-behaved read on *another* uring bdev hangs forever.
#[test]
fn a_waker_that_reads_the_channel_never_stops_other_bdevs_io() {
    let rt = runtime();
    let file_a = temp_file(1 << 20);
    let file_b = temp_file(1 << 20);
    let a = BdevDesc::open(Arc::new(
        UringBdev::open(file_a.path(), &UringOptions::default()).expect("open a"),
    ))
    .expect("open bdev");
    let b = BdevDesc::open(Arc::new(
        UringBdev::open(file_b.path(), &UringOptions::default()).expect("open b"),
    ))
    .expect("open bdev");
    let outcome = rt
        .block_on(ReactorId(0), move || async move {
            let channel_a = a.channel().expect("channel a");
            let channel_b = b.channel().expect("channel b");
            // Warm up both channels: the group works.
            let (r, _) = channel_b.read(filled(4096, 0), 0).await;
            r.expect("warm-up read on b");
            WATCHED.with(|watched| *watched.borrow_mut() = Some(channel_a.clone()));
            let mut read_a = pin!(channel_a.read(filled(4096, 0), 0));
            // Poll it once with the metrics waker, then let the reactor run its pollers.
            let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
            let waker = Waker::from(Arc::new(MetricsWaker { task }));
            assert!(read_a
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            spool_reactor::sleep(Duration::from_millis(50)).await;
            WATCHED.with(|watched| *watched.borrow_mut() = None);
            // An unrelated, well-behaved read on the other bdev.
            let done = within(Duration::from_secs(2), channel_b.read(filled(4096, 0), 0)).await;
            done.map(|(r, _)| r.map_err(|e| e.errno()))
        })
        .expect("reactor");
    assert_eq!(
        outcome,
        Some(Ok(())),
        "a read on another uring bdev of the reactor never completed"
    );
}

/// A `Bdev` whose geometry is nonsense (safe code: the trait's methods return any value).
struct Liar {
    block_size: u32,
    block_count: u64,
}

impl Bdev for Liar {
    fn name(&self) -> &str {
        "liar"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.block_count
    }
    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        MallocBdev::new("liar-inner", 4096, 16)
            .expect("malloc")
            .create_channel(slots)
    }
}

/// `BdevDesc::open` never checks the geometry a `Bdev` reports (`check_geometry` exists but
/// is only called by the crate's own devices), and `BdevDesc::size_bytes` / the channel's
/// `Geometry::of` multiply block size by block count unchecked: a device reporting
/// `u64::MAX` blocks panics the caller in debug builds ("attempt to multiply with overflow")
/// and wraps silently in release builds (range checks then run against a wrong size).
///
/// Fixed: `BdevDesc::open` returns a `Result` and refuses such a device with -EINVAL (no
/// panic); the geometry it accepted is fixed for the descriptor's life.
#[test]
fn a_device_with_an_overflowing_geometry_is_refused_not_a_panic() {
    let opened = std::panic::catch_unwind(|| {
        BdevDesc::open(Arc::new(Liar {
            block_size: 4096,
            block_count: u64::MAX,
        }))
        .map(|desc| desc.size_bytes())
        .map_err(|err| err.errno())
    });
    let opened = opened.expect("BdevDesc::open panicked on a device's geometry");
    assert_eq!(
        opened,
        Err(-libc::EINVAL),
        "a device whose size overflows u64 is refused"
    );
}

// ---------------------------------------------------------------------------------------
// Added with the fixes: the variants of the findings above, on every backend.
// ---------------------------------------------------------------------------------------

fn uring(file: &tempfile::NamedTempFile) -> Arc<UringBdev> {
    Arc::new(UringBdev::open(file.path(), &UringOptions::default()).expect("open uring"))
}

/// One of each memory backend (and the error-injection wrapper, passing and failing).
fn memory_backends() -> Vec<Arc<dyn Bdev>> {
    let failing = ErrorBdev::new(
        "err-failing",
        Arc::new(MallocBdev::new("err-failing-inner", 4096, 16).expect("malloc")),
    );
    failing.add_rule(ErrorRule::new(-libc::EIO));
    vec![
        Arc::new(MallocBdev::new("m", 4096, 16).expect("malloc")),
        Arc::new(NullBdev::new("n", 4096, 16).expect("null")),
        Arc::new(CrashBdev::new("c", 4096, 16).expect("crash")),
        Arc::new(ErrorBdev::new(
            "err-passing",
            Arc::new(MallocBdev::new("err-passing-inner", 4096, 16).expect("malloc")),
        )),
        Arc::new(failing),
    ]
}

thread_local! {
    /// The channel a `ReenteringWaker` uses when woken.
    static REENTER: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
    /// A channel a `DroppingWaker` drops when woken.
    static TO_DROP: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
    /// How many times a `ReenteringWaker` or `DroppingWaker` ran.
    static WOKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A waker that, when woken, reads the channel and starts (and drops) a read on it, then
/// wakes the task: it re-enters the slot table and the backend of the completing channel.
struct ReenteringWaker {
    task: Waker,
}

impl Wake for ReenteringWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        WOKEN.with(|woken| woken.set(woken.get() + 1));
        REENTER.with(|channel| {
            if let Some(channel) = channel.borrow().as_ref() {
                let _ = channel.in_flight();
                drop(channel.read(filled(4096, 2), 4096));
            }
        });
        self.task.wake_by_ref();
    }
}

/// A waker that drops a channel (the last handle on it) when woken.
struct DroppingWaker {
    task: Waker,
}

impl Wake for DroppingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        WOKEN.with(|woken| woken.set(woken.get() + 1));
        let channel = TO_DROP.with(|slot| slot.borrow_mut().take());
        drop(channel);
        self.task.wake_by_ref();
    }
}

/// Polls `fut` once with a waker made by `make` from the task's own waker, then lets the
/// reactor run its pollers without polling `fut` again (which would replace the waker);
/// returns how many times such a waker ran meanwhile.
async fn poll_once_with<F: Future + Unpin>(
    fut: &mut F,
    make: impl FnOnce(Waker) -> Waker,
) -> usize {
    let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let waker = make(task);
    let before = WOKEN.with(std::cell::Cell::get);
    assert!(Pin::new(fut)
        .poll(&mut Context::from_waker(&waker))
        .is_pending());
    spool_reactor::sleep(Duration::from_millis(50)).await;
    WOKEN.with(std::cell::Cell::get) - before
}

/// A waker that reads and uses the very channel whose request completes, on every backend:
/// the channel keeps working (before the fix, the poller completing it panicked on a
/// borrowed slot table or backend and was unregistered).
#[test]
fn a_waker_that_uses_the_completing_channel_never_stops_it() {
    let rt = runtime();
    let file = temp_file(1 << 20);
    let mut bdevs = memory_backends();
    bdevs.push(uring(&file));
    for bdev in bdevs {
        let name = bdev.name().to_owned();
        let desc = BdevDesc::open(bdev).expect("open");
        let outcome = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().expect("channel");
                REENTER.with(|slot| *slot.borrow_mut() = Some(channel.clone()));
                let mut read = Box::pin(channel.read(filled(4096, 0), 0));
                let woken = poll_once_with(&mut read, |task| {
                    Waker::from(Arc::new(ReenteringWaker { task }))
                })
                .await;
                let first = within(Duration::from_secs(2), read).await;
                REENTER.with(|slot| slot.borrow_mut().take());
                let again = within(Duration::from_secs(2), channel.read(filled(4096, 0), 0)).await;
                spool_reactor::sleep(Duration::from_millis(20)).await;
                (
                    woken,
                    first.map(|(r, _)| r.map_err(|e| e.errno())),
                    again.map(|(r, _)| r.map_err(|e| e.errno())),
                    channel.in_flight(),
                )
            })
            .expect("reactor");
        assert_eq!(outcome.0, 1, "{name}: the waker ran once");
        assert!(
            outcome.1.is_some(),
            "{name}: the woken read never completed"
        );
        assert!(
            outcome.2.is_some(),
            "{name}: the channel stopped completing"
        );
        assert_eq!(outcome.3, 0, "{name}: a slot stayed taken");
    }
}

/// A waker of a read on one uring bdev drops the last channel of another uring bdev of the
/// same reactor (same ring): that channel's entry is closed and its registered file slot
/// released. (The channel's backend is dropped with its poller, at the end of the reactor's
/// poller pass; see the next test for a backend dropped in the waker itself.)
#[test]
fn a_waker_dropping_the_last_channel_of_another_uring_bdev_leaks_nothing() {
    let rt = runtime();
    let (file_a, file_b) = (temp_file(1 << 20), temp_file(1 << 20));
    let (bdev_a, bdev_b) = (uring(&file_a), uring(&file_b));
    let stats_bdev = Arc::clone(&bdev_a);
    let a = BdevDesc::open(bdev_a).expect("open a");
    let b = BdevDesc::open(bdev_b).expect("open b");
    let (before, after, again) = rt
        .block_on(ReactorId(0), move || async move {
            let channel_a = a.channel().expect("channel a");
            let channel_b = b.channel().expect("channel b");
            let (r, _) = channel_b.read(filled(4096, 0), 0).await;
            r.expect("warm-up read on b");
            let before = stats_bdev.group_stats().expect("stats").channels;
            TO_DROP.with(|slot| *slot.borrow_mut() = Some(channel_b));
            let mut read = Box::pin(channel_a.read(filled(4096, 0), 0));
            let woken = poll_once_with(&mut read, |task| {
                Waker::from(Arc::new(DroppingWaker { task }))
            })
            .await;
            assert_eq!(woken, 1, "the waker ran");
            let (r, _) = read.await;
            r.expect("read on a");
            spool_reactor::sleep(Duration::from_millis(20)).await;
            let after = stats_bdev.group_stats().expect("stats").channels;
            // A new channel of b works.
            let channel_b = b.channel().expect("channel b again");
            let done = within(Duration::from_secs(2), channel_b.read(filled(4096, 0), 0)).await;
            (before, after, done.map(|(r, _)| r.map_err(|e| e.errno())))
        })
        .expect("reactor");
    assert_eq!(before, 2, "both channels attached to the ring");
    assert_eq!(
        after, 1,
        "the dropped channel's entry (and file slot) leaked"
    );
    assert_eq!(again, Some(Ok(())));
}

/// A wrapper that drops its inner channel with a request queued in it gets -ECANCELED for
/// it, on every memory backend (before the fix, the request hung).
#[test]
fn a_wrapper_dropping_its_inner_channel_gets_ecanceled_on_every_memory_backend() {
    let rt = runtime();
    for bdev in memory_backends() {
        let name = bdev.name().to_owned();
        let desc = wrap(bdev, Mode::ForwardThenDropInner);
        let outcome = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().expect("channel");
                let done =
                    within(Duration::from_millis(500), channel.read(filled(4096, 1), 0)).await;
                (
                    done.map(|(r, _)| r.map_err(|e| e.errno())),
                    channel.in_flight(),
                )
            })
            .expect("reactor");
        assert_eq!(outcome, (Some(Err(-libc::ECANCELED)), 0), "{name}");
    }
}

/// A wrapper that drops its inner uring channel after forwarding a read that one CQE
/// finishes gets the read's real result: success, with the data (a closed channel's request
/// that did finish is not failed either).
#[test]
fn a_finished_request_of_a_dropped_uring_channel_keeps_its_result() {
    let rt = runtime();
    let file = temp_file(1 << 20);
    let control = BdevDesc::open(uring(&file)).expect("open");
    let dropper = wrap(uring(&file), Mode::ForwardThenDropInner);
    let (result, data) = rt
        .block_on(ReactorId(0), move || async move {
            let control = control.channel().expect("channel");
            let (r, _) = control.write(filled(8192, 0x5a), 0).await;
            r.expect("write");
            let dropper = dropper.channel().expect("channel");
            let (r, buf) = dropper.read(filled(8192, 0), 0).await;
            (
                r.map_err(|e| e.errno()),
                buf.iter().all(|&byte| byte == 0x5a),
            )
        })
        .expect("reactor");
    assert_eq!(result, Ok(()));
    assert!(data, "the finished read's data");
}

/// A forgotten submission completes with -ECANCELED when the wrapper's submit returns, and
/// its slot (with the buffer) is released.
#[test]
fn a_forgotten_submission_is_cancelled_and_its_slot_released() {
    let rt = runtime();
    for bdev in memory_backends() {
        let name = bdev.name().to_owned();
        let desc = wrap(bdev, Mode::Forget);
        let outcome = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().expect("channel");
                let done =
                    within(Duration::from_millis(500), channel.read(filled(4096, 1), 0)).await;
                (
                    done.map(|(r, _)| r.map_err(|e| e.errno())),
                    channel.in_flight(),
                )
            })
            .expect("reactor");
        assert_eq!(outcome, (Some(Err(-libc::ECANCELED)), 0), "{name}");
    }
}

/// A `Bdev` reporting any geometry, with any iovec alignment.
struct Odd {
    block_size: u32,
    block_count: u64,
    iov_len_align: u32,
}

impl Bdev for Odd {
    fn name(&self) -> &str {
        "odd"
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn block_count(&self) -> u64 {
        self.block_count
    }
    fn iov_len_align(&self) -> u32 {
        self.iov_len_align
    }
    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        MallocBdev::new("odd-inner", 4096, 16)
            .expect("malloc")
            .create_channel(slots)
    }
}

/// Every nonsensical geometry is refused at open with -EINVAL; sane ones open.
#[test]
fn every_invalid_geometry_is_refused_at_open() {
    let open = |block_size, block_count, iov_len_align| {
        BdevDesc::open(Arc::new(Odd {
            block_size,
            block_count,
            iov_len_align,
        }))
        .map(|desc| desc.size_bytes())
        .map_err(|err| err.errno())
    };
    for (block_size, block_count, align) in [
        (0, 16, 1),
        (256, 16, 1),
        (1000, 16, 1),
        (4096, 0, 1),
        (4096, u64::MAX / 4096 + 1, 1),
        (1 << 31, u64::MAX, 1),
        (4096, 16, 3),
        (4096, 16, 8192),
    ] {
        assert_eq!(
            open(block_size, block_count, align),
            Err(-libc::EINVAL),
            "block size {block_size}, {block_count} blocks, iovec alignment {align}"
        );
    }
    assert_eq!(open(4096, 16, 0), Ok(65536));
    assert_eq!(open(512, 1, 512), Ok(512));
    assert_eq!(
        open(4096, u64::MAX / 4096, 4096),
        Ok(u64::MAX / 4096 * 4096)
    );
}

/// A wrapper's inner channel, shared with whoever may drop it.
type SharedBackend = Rc<RefCell<Option<Box<dyn ChannelBackend>>>>;

thread_local! {
    /// The inner channel of the `SharedInner` wrapper, reachable from a waker.
    static SHARED_INNER: RefCell<Option<SharedBackend>> = const { RefCell::new(None) };
}

/// A wrapper whose channel keeps its inner channel where a waker can reach it (safe code:
/// an `Rc<RefCell<..>>` in a thread-local).
struct SharedInner {
    inner: Arc<dyn Bdev>,
}

impl Bdev for SharedInner {
    fn name(&self) -> &str {
        "shared-inner"
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn iov_len_align(&self) -> u32 {
        self.inner.iov_len_align()
    }
    fn create_channel(&self, slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        let inner = Rc::new(RefCell::new(Some(self.inner.create_channel(slots)?)));
        SHARED_INNER.with(|shared| *shared.borrow_mut() = Some(Rc::clone(&inner)));
        Ok(Box::new(SharedInnerChannel { inner }))
    }
}

struct SharedInnerChannel {
    inner: SharedBackend,
}

impl ChannelBackend for SharedInnerChannel {
    fn submit(&mut self, io: Submission<'_>) {
        match self.inner.borrow_mut().as_mut() {
            Some(inner) => inner.submit(io),
            None => io.complete(-libc::ENODEV),
        }
    }
    fn poll(&mut self) -> PollStatus {
        self.inner
            .borrow_mut()
            .as_mut()
            .map_or(PollStatus::Idle, |inner| inner.poll())
    }
}

/// A waker that drops the `SharedInner` wrapper's inner channel when woken.
struct InnerDroppingWaker {
    task: Waker,
}

impl Wake for InnerDroppingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        WOKEN.with(|woken| woken.set(woken.get() + 1));
        let shared = SHARED_INNER.with(|shared| shared.borrow_mut().take());
        let inner = shared.and_then(|shared| shared.borrow_mut().take());
        drop(inner);
        self.task.wake_by_ref();
    }
}

/// A waker of a read on one uring bdev drops a uring channel backend of another bdev (a
/// wrapper's inner channel) right there, while the reactor's io_uring group is completing:
/// the channel's entry is closed and its registered file slot released. Before the fix the
/// group was borrowed while wakers ran: the close was refused ("uring group busy") and the
/// entry, with its file slot, leaked for the ring's life.
#[test]
fn a_waker_dropping_a_uring_channel_backend_leaks_no_file_slot() {
    let rt = runtime();
    let (file_a, file_b) = (temp_file(1 << 20), temp_file(1 << 20));
    let (bdev_a, bdev_b) = (uring(&file_a), uring(&file_b));
    let stats_bdev = Arc::clone(&bdev_a);
    let a = BdevDesc::open(bdev_a).expect("open a");
    let b = BdevDesc::open(Arc::new(SharedInner { inner: bdev_b })).expect("open b");
    let (before, after, dropped) = rt
        .block_on(ReactorId(0), move || async move {
            let channel_a = a.channel().expect("channel a");
            let channel_b = b.channel().expect("channel b");
            let (r, _) = channel_b.read(filled(4096, 0), 0).await;
            r.expect("warm-up read on b");
            let before = stats_bdev.group_stats().expect("stats").channels;
            let mut read = Box::pin(channel_a.read(filled(4096, 0), 0));
            let woken = poll_once_with(&mut read, |task| {
                Waker::from(Arc::new(InnerDroppingWaker { task }))
            })
            .await;
            assert_eq!(woken, 1, "the waker ran");
            let (r, _) = read.await;
            r.expect("read on a");
            spool_reactor::sleep(Duration::from_millis(20)).await;
            let after = stats_bdev.group_stats().expect("stats").channels;
            // The wrapper's channel has no inner channel left.
            let (r, _) = channel_b.read(filled(4096, 0), 0).await;
            (before, after, r.map_err(|e| e.errno()))
        })
        .expect("reactor");
    assert_eq!(before, 2, "both channels attached to the ring");
    assert_eq!(
        after, 1,
        "the dropped channel's entry (and file slot) leaked"
    );
    assert_eq!(dropped, Err(-libc::ENODEV));
}
