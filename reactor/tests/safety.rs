//! Goal: failures and cancellations on a reactor leave nothing wedged (issue 16): a poller
//! unregistered during a poll pass does not run again in it, an io device cannot be
//! unregistered while a channel of it is being created, and a panic in a message closure, a
//! `spawn_on` constructor, a poller or a timer's waker is contained and logged, the reactor
//! going on (threaded and simulated).
//! Method: each finding is reproduced directly: pollers that drop each other's handles, a
//! channel create callback held on a barrier while another thread unregisters, and closures
//! that panic, followed by checks that later work on the same reactor still runs.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use spool_reactor::{
    poller_register, send_msg, sleep, spawn_local, spawn_on, stats, IdleMode, IoDevice, PollStatus,
    PollerHandle, ReactorError, ReactorId, Runtime, RuntimeOptions, Sim, SimOptions, TraceKind,
};

fn one_reactor() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .expect("runtime starts")
}

#[test]
fn a_poller_unregistered_during_a_pass_is_skipped_at_once() {
    let mut sim = Sim::new(SimOptions {
        seed: 16,
        reactors: 1,
    });
    let (runs_after_drop, closure_refs) = sim
        .block_on(ReactorId(0), || async {
            let victim_slot: Rc<RefCell<Option<PollerHandle>>> = Rc::new(RefCell::new(None));
            let dropped = Rc::new(Cell::new(false));
            let runs_after_drop = Rc::new(Cell::new(0u32));
            // Registered first, so it runs before the victim in every pass: it drops the
            // victim's handle on its first call.
            let killer_slot = Rc::clone(&victim_slot);
            let killer_dropped = Rc::clone(&dropped);
            let _killer = poller_register("killer", None, move || {
                if let Some(victim) = killer_slot.borrow_mut().take() {
                    drop(victim);
                    killer_dropped.set(true);
                }
                PollStatus::Idle
            })
            .unwrap();
            let victim_dropped = Rc::clone(&dropped);
            let victim_runs = Rc::clone(&runs_after_drop);
            let victim = poller_register("victim", None, move || {
                if victim_dropped.get() {
                    victim_runs.set(victim_runs.get() + 1);
                }
                PollStatus::Idle
            })
            .unwrap();
            *victim_slot.borrow_mut() = Some(victim);
            sleep(Duration::from_micros(50)).await;
            assert!(dropped.get(), "the killer poller ran");
            (runs_after_drop.get(), Rc::strong_count(&runs_after_drop))
        })
        .unwrap();
    assert_eq!(
        runs_after_drop, 0,
        "a poller whose handle was dropped ran again in the same pass"
    );
    assert_eq!(
        closure_refs, 1,
        "the unregistered poller's closure was dropped"
    );
}

#[test]
fn unregister_is_refused_while_a_channel_is_being_created() {
    let runtime = one_reactor();
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let (create_entered, create_release) = (Arc::clone(&entered), Arc::clone(&release));
    let device: IoDevice<u32> = IoDevice::register(
        "held-create",
        move |_| {
            // Hold the create callback until the test thread has tried to unregister.
            create_entered.wait();
            create_release.wait();
            Ok(7)
        },
        |_, _| {},
    );
    let on_reactor = device.clone();
    let handle = runtime
        .spawn_on(ReactorId(0), move || async move {
            let channel = on_reactor.get_channel()?;
            Ok::<u32, ReactorError>(*channel)
        })
        .unwrap();
    entered.wait();
    let unregistered = device.unregister();
    release.wait();
    let created = handle.wait().unwrap();
    assert_eq!(
        unregistered,
        Err(ReactorError::DeviceBusy("held-create".into())),
        "unregister returned while a channel was being created (the channel: {created:?})"
    );
    assert_eq!(created, Ok(7), "the creation in progress completes");
    // Its channel dropped with the task: now the device unregisters, and refuses new ones.
    assert_eq!(device.unregister(), Ok(()));
    let after = device.clone();
    let refused = runtime
        .block_on(ReactorId(0), move || async move {
            after.get_channel().map(|channel| *channel)
        })
        .unwrap();
    assert_eq!(refused, Err(ReactorError::DeviceGone("held-create".into())));
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn a_failed_channel_create_gives_its_reservation_back() {
    let mut sim = Sim::new(SimOptions {
        seed: 3,
        reactors: 1,
    });
    let device: IoDevice<u32> = IoDevice::register("fails", |_| Err(-5), |_, _| {});
    let on_reactor = device.clone();
    let failed = sim
        .block_on(ReactorId(0), move || async move {
            on_reactor.get_channel().map(|channel| *channel)
        })
        .unwrap();
    assert_eq!(failed.map_err(|err| err.errno()), Err(-5));
    assert_eq!(device.unregister(), Ok(()), "nothing is left creating");
}

/// A waker whose wake panics: what a timer calls when its sleep is due.
struct PanickingWaker;

impl Wake for PanickingWaker {
    fn wake(self: Arc<Self>) {
        panic!("waker panics (expected by the test)");
    }
}

/// Leaves a due-in-`after` timer on the calling reactor whose waker panics when it fires.
fn leave_a_panicking_timer(after: Duration) {
    let waker = Waker::from(Arc::new(PanickingWaker));
    let mut context = Context::from_waker(&waker);
    for _ in 0..100 {
        let mut sleeping = Box::pin(sleep(after));
        // Ready only if this thread was preempted for `after` since the sleep was made.
        if sleeping.as_mut().poll(&mut context).is_pending() {
            // Keep the timer registered: dropping the sleep would cancel it.
            std::mem::forget(sleeping);
            return;
        }
    }
    panic!("could not register a timer in 100 tries");
}

/// Yields (keeping the reactor's loop turning) until `done`, at most 100 000 times.
async fn turn_until(done: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        spool_reactor::yield_now().await;
    }
    panic!("the condition never came true; the healthy poller stopped running");
}

/// One of each panic the reactor must contain, then proof that everything still works on the
/// reactor that took them: messages, spawns, pollers, timers and tasks. Returns what a
/// panicking `spawn_on` constructor and a panicking spawned future reported.
async fn panic_everywhere_then_check(target: ReactorId) -> (u32, u32) {
    // A message closure.
    send_msg(target, || panic!("message panics (expected by the test)")).unwrap();
    // A spawn_on constructor, and a future it built.
    let constructor = spawn_on(target, || -> std::future::Ready<u32> {
        panic!("constructor panics (expected by the test)")
    })
    .unwrap()
    .await;
    assert_eq!(constructor, Err(ReactorError::Panicked(target)));
    let future = spawn_on(target, || async {
        spool_reactor::yield_now().await;
        panic!("future panics (expected by the test)")
    })
    .unwrap()
    .await
    .map(|()| 0u32);
    assert_eq!(future, Err(ReactorError::Panicked(target)));
    // A poller (on its second call) and a timer's waker.
    let checked = spawn_on(target, || async {
        let calls = Rc::new(Cell::new(0u32));
        let poller_calls = Rc::clone(&calls);
        let panicking = poller_register("panics", None, move || {
            poller_calls.set(poller_calls.get() + 1);
            if poller_calls.get() == 2 {
                panic!("poller panics (expected by the test)");
            }
            PollStatus::Idle
        })
        .unwrap();
        leave_a_panicking_timer(Duration::from_micros(500));
        let ticks = Rc::new(Cell::new(0u32));
        let poller_ticks = Rc::clone(&ticks);
        let _healthy = poller_register("healthy", None, move || {
            poller_ticks.set(poller_ticks.get() + 1);
            PollStatus::Idle
        })
        .unwrap();
        // The timer fires first (it is due earlier); then keep the loop turning (an idle
        // reactor in sleep mode would only pass once per timer) for enough passes that a
        // still-registered panicking poller would run again.
        sleep(Duration::from_millis(2)).await;
        turn_until(|| ticks.get() >= 20).await;
        assert_eq!(
            calls.get(),
            2,
            "the panicking poller is unregistered at once"
        );
        assert_eq!(stats().unwrap().pollers, vec!["healthy"]);
        drop(panicking);
        let before = ticks.get();
        turn_until(|| ticks.get() >= before + 5).await;
        // Messages, local tasks and timers still work.
        let (tx, rx) = std::sync::mpsc::channel();
        send_msg(spool_reactor::reactor_id().unwrap(), move || {
            tx.send(5).unwrap()
        })
        .unwrap();
        let value = spawn_local(async { 7u32 }).await.unwrap();
        sleep(Duration::from_micros(10)).await;
        value + rx.try_recv().unwrap_or(0)
    })
    .unwrap()
    .await
    .unwrap();
    (checked, 0)
}

#[test]
fn panics_on_a_threaded_reactor_are_contained() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
            vec![0, 1]
        } else {
            vec![0]
        },
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let target = *runtime.reactors().last().unwrap();
    let (checked, _) = runtime
        .block_on(ReactorId(0), move || panic_everywhere_then_check(target))
        .unwrap();
    assert_eq!(checked, 12);
    // The reactor that took the panics still answers, and nothing leaked or died.
    assert_eq!(runtime.block_on(target, || async { 42 }), Ok(42));
    let report = runtime.stop();
    assert!(report.panicked.is_empty(), "{report:?}");
    assert_eq!(report.leaked_channels, 0);
}

#[test]
fn panics_on_a_simulated_reactor_are_contained_and_traced() {
    for seed in [1, 2, 3, 16] {
        let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
        let (checked, _) = sim
            .block_on(ReactorId(0), || panic_everywhere_then_check(ReactorId(1)))
            .unwrap();
        assert_eq!(checked, 12, "seed {seed}");
        let panics: Vec<_> = sim
            .trace()
            .into_iter()
            .filter_map(|event| match event.kind {
                TraceKind::Panic(what) => Some((event.reactor, what)),
                _ => None,
            })
            .collect();
        let mut kinds: Vec<&str> = panics.iter().map(|(_, what)| *what).collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            [
                "message",
                "poller",
                "spawn_on constructor",
                "task",
                "timer waker"
            ],
            "seed {seed}: {panics:?}"
        );
        assert!(panics.iter().all(|(reactor, _)| *reactor == ReactorId(1)));
        assert_eq!(sim.block_on(ReactorId(1), || async { 42 }), Ok(42));
    }
}

#[test]
fn a_panicking_channel_create_gives_its_reservation_back() {
    let mut sim = Sim::new(SimOptions {
        seed: 5,
        reactors: 1,
    });
    let device: IoDevice<u32> = IoDevice::register(
        "panics",
        |_| panic!("create panics (expected by the test)"),
        |_, _| {},
    );
    let on_reactor = device.clone();
    let outcome = sim.block_on(ReactorId(0), move || async move {
        on_reactor.get_channel().map(|channel| *channel)
    });
    assert_eq!(outcome, Err(ReactorError::Panicked(ReactorId(0))));
    assert_eq!(device.unregister(), Ok(()), "nothing is left creating");
}

#[test]
fn a_panicking_channel_walk_visit_reports_panicked() {
    let mut sim = Sim::new(SimOptions {
        seed: 9,
        reactors: 2,
    });
    let device: IoDevice<u32> = IoDevice::register("walked", |reactor| Ok(reactor.0), |_, _| {});
    let walker = device.clone();
    let outcome = sim
        .block_on(ReactorId(0), move || async move {
            let here = walker.get_channel().unwrap();
            let there = spawn_on(ReactorId(1), {
                let device = walker.clone();
                move || async move {
                    let channel = device.get_channel().unwrap();
                    sleep(Duration::from_millis(1)).await;
                    drop(channel);
                }
            })
            .unwrap();
            sleep(Duration::from_micros(100)).await;
            let walked = walker
                .for_each_channel(|reactor, _| {
                    if reactor == ReactorId(1) {
                        panic!("visit panics (expected by the test)");
                    }
                    Ok(())
                })
                .unwrap()
                .await;
            there.await.unwrap();
            drop(here);
            walked
        })
        .unwrap();
    assert_eq!(outcome, Err(ReactorError::Panicked(ReactorId(1))));
    assert_eq!(sim.block_on(ReactorId(1), || async { 1 }), Ok(1));
}
