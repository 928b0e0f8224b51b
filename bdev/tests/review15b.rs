//! Second review of issue 15 (a sound bdev API): safe code outside the crate trying to break
//! the guarantees `docs/bdev.md` ("Soundness") states after the first review's fixes. Each
//! test asserts a stated guarantee and fails where safe code breaks it. None shows the kernel
//! touching memory a live request does not own; they show: a forgotten submission that hangs
//! forever when its backend made a re-entrant (-EBUSY) submit first (the table's single
//! "unconsumed" marker is overwritten); wakers dropped (their `Drop`, user code) while the
//! slot table is mutably borrowed (`poll_done` replacing a waker, `abandon`), which panics
//! the task, leaks the slot, or, from a waker run by the io_uring group poller, kills that
//! poller and every uring bdev of the reactor; cached wakers dropped with a closed uring
//! channel's table under the group borrow, leaking another channel's entry and file slot;
//! and a panicking `submit` started from a waker killing the uring group poller.

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use spool_bdev::{
    Bdev, BdevChannel, BdevDesc, BdevError, ChannelBackend, DmaBuf, IoSlots, MallocBdev, NullBdev,
    Submission, UringBdev, UringOptions,
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

fn uring(file: &tempfile::NamedTempFile) -> Arc<UringBdev> {
    Arc::new(UringBdev::open(file.path(), &UringOptions::default()).expect("uring open"))
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

fn memory_backends() -> Vec<Arc<dyn Bdev>> {
    vec![
        Arc::new(MallocBdev::new("r15b-malloc", 4096, 64).expect("malloc")),
        Arc::new(NullBdev::new("r15b-null", 4096, 64).expect("null")),
    ]
}

thread_local! {
    /// The channel a `Nesting` wrapper's submit re-enters (its own, shared on the reactor).
    static NEST: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
    /// What the nested request's future resolved to.
    static NESTED: RefCell<Vec<Result<(), i32>>> = const { RefCell::new(Vec::new()) };
}

/// A wrapper whose submit first makes a request on its own channel (a re-entrant submit: it
/// gets -EBUSY, as documented), then forgets its submission (safe code, documented to be
/// cancelled when the submit call returns).
struct Nesting {
    inner: Arc<dyn Bdev>,
}

impl Bdev for Nesting {
    fn name(&self) -> &str {
        "r15b-nesting"
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
        Ok(Box::new(NestingChannel {
            inner: self.inner.create_channel(slots)?,
        }))
    }
}

struct NestingChannel {
    inner: Box<dyn ChannelBackend>,
}

impl ChannelBackend for NestingChannel {
    fn submit(&mut self, io: Submission<'_>) {
        if let Some(channel) = NEST.with(|nest| nest.borrow_mut().take()) {
            // Re-entrant: the backend is busy submitting, so this one fails with -EBUSY.
            let mut nested = pin!(channel.read(filled(4096, 0), 0));
            let waker = std::task::Waker::noop();
            if let Poll::Ready((result, _buf)) = nested
                .as_mut()
                .poll(&mut std::task::Context::from_waker(waker))
            {
                NESTED.with(|n| n.borrow_mut().push(result.map_err(|e| e.errno())));
            }
            std::mem::forget(io);
            return;
        }
        self.inner.submit(io);
    }
    fn poll(&mut self) -> PollStatus {
        self.inner.poll()
    }
}

/// docs/bdev.md and `Submission`: a forgotten submission "is still completed with -ECANCELED,
/// when the channel's submit call returns", and a re-entrant submit fails with -EBUSY. Both
/// together: the nested submission overwrites the table's single "unconsumed" marker and
/// consumes it, so the outer, forgotten request is never cancelled: its future never
/// resolves and its slot (with the caller's buffer) is held forever.
#[test]
fn a_forgotten_submission_after_a_reentrant_submit_never_hangs() {
    let rt = runtime();
    for bdev in memory_backends() {
        let name = bdev.name().to_owned();
        let desc = BdevDesc::open(Arc::new(Nesting { inner: bdev })).expect("open");
        let outcome = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().expect("channel");
                NEST.with(|nest| *nest.borrow_mut() = Some(channel.clone()));
                let done =
                    within(Duration::from_millis(500), channel.read(filled(4096, 1), 0)).await;
                spool_reactor::sleep(Duration::from_millis(20)).await;
                (
                    done.map(|(r, _)| r.map_err(|e| e.errno())),
                    channel.in_flight(),
                    NESTED.with(|n| n.borrow_mut().drain(..).collect::<Vec<_>>()),
                )
            })
            .expect("reactor");
        assert_eq!(
            outcome.2,
            vec![Err(-libc::EBUSY)],
            "{name}: the nested submit gets -EBUSY"
        );
        assert_eq!(
            (outcome.0, outcome.1),
            (Some(Err(-libc::ECANCELED)), 0),
            "{name}: the forgotten request hung (None) or its slot leaked"
        );
    }
}

/// A waker whose drop (user code: a task's last reference going away, say) reads the
/// channel, as `BdevChannel::in_flight` lets any code do.
struct ReadsChannelOnDrop;

impl std::task::Wake for ReadsChannelOnDrop {
    fn wake(self: Arc<Self>) {}
}

impl Drop for ReadsChannelOnDrop {
    fn drop(&mut self) {
        NEST.with(|nest| {
            if let Some(channel) = nest.borrow().as_ref() {
                let _ = channel.in_flight();
            }
        });
    }
}

/// Polls `fut` once with a `ReadsChannelOnDrop` waker (the slot keeps the only reference),
/// then either polls it again with another waker (the slot replaces the first) or drops it
/// (the slot forgets its waker); returns whether that panicked.
fn replace_or_drop_waker_panics<F: Future + Unpin>(mut fut: F, drop_it: bool) -> bool {
    let waker = std::task::Waker::from(Arc::new(ReadsChannelOnDrop));
    let pending = std::pin::Pin::new(&mut fut)
        .poll(&mut std::task::Context::from_waker(&waker))
        .is_pending();
    assert!(pending, "the request completes from a poller, not inline");
    drop(waker);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        if drop_it {
            drop(fut);
        } else {
            let _ = std::pin::Pin::new(&mut fut)
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            // Keep it alive until it completes, if it did not.
            std::mem::forget(fut);
        }
    }))
    .is_err()
}

/// io.rs: "Completing never runs a waker ... so a waker may use or drop any channel", and
/// docs/bdev.md says no waker runs under a borrow. But the slot table drops a waker (user
/// code, its `Drop`) while holding its `RefCell` mutably borrowed: when a future is polled
/// with a new waker (`poll_done` replaces the old one) and when a future is dropped
/// (`abandon` clears it). A waker whose drop reads the channel panics there ("already
/// mutably borrowed") on the reactor, on every backend.
#[test]
fn a_waker_dropped_by_the_slot_table_may_read_the_channel() {
    let rt = runtime();
    let file = temp_file(1 << 20);
    let mut bdevs = memory_backends();
    bdevs.push(uring(&file));
    for bdev in bdevs {
        let name = bdev.name().to_owned();
        let desc = BdevDesc::open(bdev).expect("open");
        let (replaced, dropped) = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().expect("channel");
                NEST.with(|nest| *nest.borrow_mut() = Some(channel.clone()));
                let replaced =
                    replace_or_drop_waker_panics(Box::pin(channel.read(filled(4096, 0), 0)), false);
                spool_reactor::sleep(Duration::from_millis(20)).await;
                let dropped =
                    replace_or_drop_waker_panics(Box::pin(channel.read(filled(4096, 0), 0)), true);
                spool_reactor::sleep(Duration::from_millis(20)).await;
                NEST.with(|nest| nest.borrow_mut().take());
                (replaced, dropped)
            })
            .expect("reactor");
        assert!(
            !replaced,
            "{name}: replacing a waker ran its drop under the slot table's borrow (panic)"
        );
        assert!(
            !dropped,
            "{name}: dropping a future ran its waker's drop under the slot table's borrow (panic)"
        );
    }
}

type Parked = std::pin::Pin<Box<dyn Future<Output = (Result<(), BdevError>, DmaBuf)>>>;

thread_local! {
    /// A request's future parked where a waker can drop it.
    static PARKED: RefCell<Option<Parked>> = const { RefCell::new(None) };
}

/// A waker that drops the parked future when woken, then wakes its task.
struct DropsParkedFuture {
    task: std::task::Waker,
}

impl std::task::Wake for DropsParkedFuture {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let parked = PARKED.with(|parked| parked.borrow_mut().take());
        drop(parked);
        self.task.wake_by_ref();
    }
}

/// The escalation of the test above: the io_uring group poller runs wakers (as designed), and
/// a waker drops another request's future (a `select!` losing branch, say) whose own waker's
/// drop reads its channel. The slot table panics on its borrow inside the group poller, the
/// reactor unregisters the panicking poller, and every uring bdev of the reactor (same ring
/// configuration) stops completing I/O for good.
#[test]
fn a_waker_dropping_a_future_never_stops_the_uring_group() {
    let rt = runtime();
    let (file_a, file_b) = (temp_file(1 << 20), temp_file(1 << 20));
    let a = BdevDesc::open(uring(&file_a)).expect("open a");
    let b = BdevDesc::open(uring(&file_b)).expect("open b");
    let (first, later) = rt
        .block_on(ReactorId(0), move || async move {
            let channel_a = a.channel().expect("channel a");
            let channel_b: &'static BdevChannel =
                Box::leak(Box::new(b.channel().expect("channel b")));
            NEST.with(|nest| *nest.borrow_mut() = Some(channel_b.clone()));
            // b's read, polled once with a waker whose drop reads channel b, then parked.
            let mut read_b: Parked = Box::pin(channel_b.read(filled(4096, 0), 0));
            let reads = std::task::Waker::from(Arc::new(ReadsChannelOnDrop));
            assert!(read_b
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&reads))
                .is_pending());
            drop(reads);
            PARKED.with(|parked| *parked.borrow_mut() = Some(read_b));
            // a's read, whose waker (run by the group poller) drops b's read.
            let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
            let waker = std::task::Waker::from(Arc::new(DropsParkedFuture { task }));
            let mut read_a = Box::pin(channel_a.read(filled(4096, 0), 0));
            assert!(read_a
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker))
                .is_pending());
            drop(waker);
            spool_reactor::sleep(Duration::from_millis(50)).await;
            let first = within(Duration::from_secs(2), read_a).await;
            let later = within(Duration::from_secs(2), channel_a.read(filled(4096, 0), 0)).await;
            NEST.with(|nest| nest.borrow_mut().take());
            (
                first.map(|(r, _)| r.map_err(|e| e.errno())),
                later.map(|(r, _)| r.map_err(|e| e.errno())),
            )
        })
        .expect("reactor");
    assert_eq!(first, Some(Ok(())), "the woken read");
    assert_eq!(
        later,
        Some(Ok(())),
        "the reactor's io_uring group stopped: a later read never completed"
    );
}

thread_local! {
    /// A channel (the last handle on it) a `DropsChannelOnDrop` waker drops.
    static TO_DROP: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
}

/// A waker whose drop drops a channel (a task's last reference going, with its state).
struct DropsChannelOnDrop;

impl std::task::Wake for DropsChannelOnDrop {
    fn wake(self: Arc<Self>) {}
}

impl Drop for DropsChannelOnDrop {
    fn drop(&mut self) {
        let channel = TO_DROP.with(|slot| slot.borrow_mut().take());
        drop(channel);
        let shared = SHARED_INNER.with(|shared| shared.borrow_mut().take());
        let inner = shared.and_then(|shared| shared.borrow_mut().take());
        drop(inner);
    }
}

/// A wrapper's inner channel, shared with whoever may drop it.
type SharedBackend = Rc<RefCell<Option<Box<dyn ChannelBackend>>>>;

thread_local! {
    /// The inner channel of the `SharedInner` wrapper, reachable from a waker's drop.
    static SHARED_INNER: RefCell<Option<SharedBackend>> = const { RefCell::new(None) };
}

/// A wrapper whose channel keeps its inner channel where other code can reach it (safe code:
/// an `Rc<RefCell<..>>` in a thread-local), as review15.rs's `SharedInner`.
struct SharedInner {
    inner: Arc<dyn Bdev>,
}

impl Bdev for SharedInner {
    fn name(&self) -> &str {
        "r15b-shared-inner"
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

/// The slot table keeps each slot's last waker for reuse, and a closed io_uring channel's
/// group entry holds the last reference to the table until its last CQE: the table, and the
/// cached wakers, are dropped by the group poller while it holds the group borrowed
/// (`remove_entry`). A cached waker whose drop drops another uring channel backend (a
/// wrapper's inner channel, as in review15.rs) then finds the
/// group busy, and that channel's entry and registered file slot leak for the ring's life
/// ("uring group busy while destroying a channel; its entry is leaked").
#[test]
fn a_cached_waker_dropped_with_a_closed_uring_table_leaks_no_entry() {
    let rt = runtime();
    let (file_x, file_y, file_z) = (temp_file(1 << 20), temp_file(1 << 20), temp_file(1 << 20));
    let (x, y, z_bdev) = (uring(&file_x), uring(&file_y), uring(&file_z));
    let stats = Arc::clone(&z_bdev);
    let x = BdevDesc::open(x).expect("open x");
    let y = BdevDesc::open(Arc::new(SharedInner { inner: y })).expect("open y");
    let z = BdevDesc::open(z_bdev).expect("open z");
    let (before, after) = rt
        .block_on(ReactorId(0), move || async move {
            let channel_z = z.channel().expect("channel z");
            let channel_y = y.channel().expect("channel y");
            let (r, _) = channel_y.read(filled(4096, 0), 0).await;
            r.expect("read y");
            // The waker's drop drops y's inner uring channel (its backend) right there.
            let keep_y = channel_y;
            {
                let channel_x = x.channel().expect("channel x");
                // Slot 0 completes with the custom waker cached in it.
                let waker = std::task::Waker::from(Arc::new(DropsChannelOnDrop));
                let mut a = Box::pin(channel_x.read(filled(4096, 0), 0));
                let b = channel_x.read(filled(4096, 0), 4096);
                assert!(a
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(&waker))
                    .is_pending());
                drop(waker);
                spool_reactor::sleep(Duration::from_millis(50)).await;
                let (r, _) = a.await;
                r.expect("read a");
                let (r, _) = b.await;
                r.expect("read b");
                // A read left in the ring (abandoned), then the channel goes.
                drop(channel_x.read(filled(4096, 0), 8192));
            }
            let before = stats.group_stats().expect("stats").channels;
            spool_reactor::sleep(Duration::from_millis(100)).await;
            let after = stats.group_stats().expect("stats").channels;
            drop(channel_z);
            drop(keep_y);
            (before, after)
        })
        .expect("reactor");
    assert_eq!(before, 3, "x (draining), y and z attached");
    assert_eq!(
        after, 1,
        "only z is left: y's entry (and registered file slot) leaked"
    );
}

/// A wrapper whose submit panics (a `todo!()` for a kind it does not handle yet).
struct PanicsInSubmit {
    inner: Arc<dyn Bdev>,
}

impl Bdev for PanicsInSubmit {
    fn name(&self) -> &str {
        "r15b-panics"
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }
    fn create_channel(&self, _slots: Rc<IoSlots>) -> Result<Box<dyn ChannelBackend>, BdevError> {
        Ok(Box::new(PanicsInSubmitChannel))
    }
}

struct PanicsInSubmitChannel;

impl ChannelBackend for PanicsInSubmitChannel {
    fn submit(&mut self, io: Submission<'_>) {
        todo!("{:?} is not handled yet", io.kind())
    }
    fn poll(&mut self) -> PollStatus {
        PollStatus::Idle
    }
}

thread_local! {
    /// The channel a `SubmitsOnWake` waker reads from.
    static SUBMIT_ON: RefCell<Option<BdevChannel>> = const { RefCell::new(None) };
}

/// A waker that starts (and drops) a read on another channel when woken, then wakes its
/// task: docs/bdev.md says a waker may "start or drop requests".
struct SubmitsOnWake {
    task: std::task::Waker,
}

impl std::task::Wake for SubmitsOnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let channel = SUBMIT_ON.with(|slot| slot.borrow_mut().take());
        if let Some(channel) = channel {
            drop(channel.read(filled(4096, 0), 0));
        }
        self.task.wake_by_ref();
    }
}

/// docs/bdev.md: "A `submit` that panics leaks nothing ... The panic itself is contained with
/// the task, as any task panic", and a waker may start requests. A request started from a
/// waker, on a channel whose backend panics in `submit`, panics inside the io_uring group
/// poller that runs the waker: the reactor unregisters that poller, and every uring bdev of
/// the reactor stops completing (the panic is not contained with any task).
#[test]
fn a_panicking_submit_started_by_a_waker_never_stops_the_uring_group() {
    let rt = runtime();
    let file = temp_file(1 << 20);
    let a = BdevDesc::open(uring(&file)).expect("open a");
    let p = BdevDesc::open(Arc::new(PanicsInSubmit {
        inner: Arc::new(NullBdev::new("r15b-null-p", 4096, 64).expect("null")),
    }))
    .expect("open p");
    let (first, later) = rt
        .block_on(ReactorId(0), move || async move {
            let channel_a = a.channel().expect("channel a");
            SUBMIT_ON.with(|slot| *slot.borrow_mut() = Some(p.channel().expect("channel p")));
            let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
            let waker = std::task::Waker::from(Arc::new(SubmitsOnWake { task }));
            let mut read_a = Box::pin(channel_a.read(filled(4096, 0), 0));
            assert!(read_a
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker))
                .is_pending());
            drop(waker);
            spool_reactor::sleep(Duration::from_millis(50)).await;
            let first = within(Duration::from_secs(2), read_a).await;
            let later = within(Duration::from_secs(2), channel_a.read(filled(4096, 0), 0)).await;
            (
                first.map(|(r, _)| r.map_err(|e| e.errno())),
                later.map(|(r, _)| r.map_err(|e| e.errno())),
            )
        })
        .expect("reactor");
    assert_eq!(first, Some(Ok(())), "the woken read");
    assert_eq!(
        later,
        Some(Ok(())),
        "the reactor's io_uring group stopped: a later read never completed"
    );
}
