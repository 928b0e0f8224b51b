//! Goal: the threaded runtime keeps the reactor contract: messages all arrive in per-sender
//! order, broadcasts complete once, channels are per reactor and refcounted, the
//! for_each_channel walk visits each holder once and completes on the caller, timed pollers
//! fire, a panicking task leaves its reactor running, and a stop leaks no channel.
//! Method: two reactors (cores 0 and 1, unpinned when pinning fails), in sleep idle mode so
//! the tests do not fight over this machine's two cores.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_reactor::{
    poller_register, reactor_id, send_msg, spawn_local, IdleMode, IoDevice, PollStatus, ReactorId,
    Runtime, RuntimeOptions,
};

fn two_reactors() -> Runtime {
    let cores: Vec<usize> = if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        vec![0, 1]
    } else {
        vec![0]
    };
    Runtime::start(&RuntimeOptions {
        cores,
        idle: IdleMode::Sleep,
        pin: true,
    })
    .expect("runtime starts")
}

#[test]
fn messages_across_reactors_arrive_in_per_sender_order() {
    let runtime = two_reactors();
    let reactors = runtime.reactors();
    let target = *reactors.last().unwrap();
    let seen: Arc<Mutex<Vec<(u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    const PER_SENDER: u32 = 10_000;
    // Every reactor sends PER_SENDER numbered messages to `target`, and the test thread too.
    let mut handles = Vec::new();
    for &sender in &reactors {
        let seen = Arc::clone(&seen);
        handles.push(
            runtime
                .spawn_on(sender, move || async move {
                    let me = reactor_id().unwrap().0;
                    for seq in 0..PER_SENDER {
                        let seen = Arc::clone(&seen);
                        send_msg(target, move || seen.lock().unwrap().push((me, seq))).unwrap();
                    }
                })
                .unwrap(),
        );
    }
    for seq in 0..PER_SENDER {
        let seen = Arc::clone(&seen);
        runtime
            .send_msg(target, move || seen.lock().unwrap().push((999, seq)))
            .unwrap();
    }
    for handle in handles {
        handle.wait().unwrap();
    }
    // A final round trip through every sender's queue to target flushes what they sent.
    let expected = (reactors.len() as u32 + 1) * PER_SENDER;
    for _ in 0..200 {
        if seen.lock().unwrap().len() as u32 == expected {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len() as u32,
        expected,
        "every message delivered exactly once"
    );
    let mut next_per_sender = std::collections::HashMap::new();
    for (sender, seq) in seen {
        let next = next_per_sender.entry(sender).or_insert(0u32);
        assert_eq!(
            seq, *next,
            "sender {sender}: message {seq} arrived out of order"
        );
        *next += 1;
    }
    let report = runtime.stop();
    assert!(report.panicked.is_empty());
}

#[test]
fn broadcast_runs_on_every_reactor_then_completes_once() {
    let runtime = two_reactors();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let ran_in = Arc::clone(&ran);
    runtime
        .broadcast(move |id| {
            assert_eq!(
                reactor_id().unwrap(),
                id,
                "broadcast runs on the reactor it names"
            );
            ran_in.lock().unwrap().push(id);
        })
        .unwrap()
        .wait()
        .unwrap();
    let mut ran = ran.lock().unwrap().clone();
    ran.sort();
    assert_eq!(ran, runtime.reactors());
    runtime.stop();
}

struct Counter {
    reactor: ReactorId,
    visits: Cell<u32>,
}

#[test]
fn channels_are_per_reactor_refcounted_and_walked_once_each() {
    let runtime = two_reactors();
    let created = Arc::new(AtomicUsize::new(0));
    let destroyed = Arc::new(AtomicUsize::new(0));
    let (created_in, destroyed_in) = (Arc::clone(&created), Arc::clone(&destroyed));
    let device: IoDevice<Counter> = IoDevice::register(
        "counter",
        move |reactor| {
            created_in.fetch_add(1, Ordering::SeqCst);
            Ok(Counter {
                reactor,
                visits: Cell::new(0),
            })
        },
        move |reactor, counter| {
            assert_eq!(reactor, counter.reactor);
            destroyed_in.fetch_add(1, Ordering::SeqCst);
        },
    );
    let reactors = runtime.reactors();
    // Each reactor takes its channel twice (the second is the same context) and parks it in
    // a task that waits for a stop flag, so the channels stay held across the walk.
    let release = Arc::new(AtomicUsize::new(0));
    let mut holders = Vec::new();
    for &reactor in &reactors {
        let device = device.clone();
        let release = Arc::clone(&release);
        holders.push(
            runtime
                .spawn_on(reactor, move || async move {
                    let first = device.get_channel().unwrap();
                    let second = device.get_channel().unwrap();
                    assert_eq!(first.ref_count(), 2, "same reactor shares one context");
                    assert_eq!(first.reactor, second.reactor);
                    while release.load(Ordering::SeqCst) == 0 {
                        spool_reactor::sleep(Duration::from_millis(1)).await;
                    }
                    first.visits.get()
                })
                .unwrap(),
        );
    }
    while device.channel_holders().len() < reactors.len() {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(created.load(Ordering::SeqCst), reactors.len());
    let origin = reactors[0];
    let visit_device = device.clone();
    let (order, completed_on) = runtime
        .block_on(origin, move || async move {
            let order = Arc::new(Mutex::new(Vec::new()));
            let order_in = Arc::clone(&order);
            let status = visit_device
                .for_each_channel(move |reactor, counter| {
                    assert_eq!(reactor_id().unwrap(), reactor, "visit runs on the holder");
                    counter.visits.set(counter.visits.get() + 1);
                    order_in.lock().unwrap().push(reactor);
                    Ok(())
                })
                .unwrap()
                .await
                .unwrap();
            assert_eq!(status, Ok(()));
            let order = order.lock().unwrap().clone();
            (order, reactor_id().unwrap())
        })
        .unwrap();
    assert_eq!(
        order, reactors,
        "each holder visited once, in reactor order"
    );
    assert_eq!(
        completed_on, origin,
        "the walk completes on the reactor that started it"
    );
    release.store(1, Ordering::SeqCst);
    for holder in holders {
        assert_eq!(
            holder.wait().unwrap(),
            1,
            "each context saw exactly one visit"
        );
    }
    assert_eq!(
        destroyed.load(Ordering::SeqCst),
        reactors.len(),
        "last handle drop destroys"
    );
    assert_eq!(runtime.live_channels(), 0);
    device.unregister().unwrap();
    let report = runtime.stop();
    assert_eq!(report.leaked_channels, 0);
}

#[test]
fn for_each_channel_stops_at_the_first_error() {
    let runtime = two_reactors();
    let device: IoDevice<()> = IoDevice::register("failing", |_| Ok(()), |_, _| {});
    let reactors = runtime.reactors();
    let mut parked = Vec::new();
    for &reactor in &reactors {
        let device = device.clone();
        parked.push(
            runtime
                .spawn_on(reactor, move || async move {
                    std::future::pending::<()>().await;
                    drop(device.get_channel())
                })
                .unwrap(),
        );
    }
    // The parked tasks never finish: they show that stop cancels tasks. The channels the walk
    // visits are held by the tasks below.
    let keep: Vec<_> = reactors
        .iter()
        .map(|&reactor| {
            let device = device.clone();
            runtime
                .spawn_on(reactor, move || async move {
                    let channel = device.get_channel().unwrap();
                    spool_reactor::sleep(Duration::from_millis(300)).await;
                    drop(channel);
                })
                .unwrap()
        })
        .collect();
    while device.channel_holders().len() < reactors.len() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let visited = Arc::new(AtomicUsize::new(0));
    let visited_in = Arc::clone(&visited);
    let walk_device = device.clone();
    let status = runtime
        .block_on(reactors[0], move || async move {
            walk_device
                .for_each_channel(move |_, _| {
                    visited_in.fetch_add(1, Ordering::SeqCst);
                    Err(-libc_ebusy())
                })
                .unwrap()
                .await
                .unwrap()
        })
        .unwrap();
    assert_eq!(status, Err(-libc_ebusy()));
    assert_eq!(
        visited.load(Ordering::SeqCst),
        1,
        "the walk ends at the first failing visit"
    );
    for handle in keep {
        handle.wait().unwrap();
    }
    let report = runtime.stop();
    assert_eq!(
        report.leaked_channels, 0,
        "stop cancels parked tasks and frees their channels"
    );
    for handle in parked {
        assert!(
            handle.wait().is_err(),
            "a task cancelled by stop reports Cancelled"
        );
    }
}

fn libc_ebusy() -> i32 {
    16
}

#[test]
fn timed_pollers_fire_at_their_period_and_active_pollers_every_pass() {
    let runtime = two_reactors();
    let (timed, active) = runtime
        .block_on(ReactorId(0), || async {
            let timed = Rc::new(Cell::new(0u32));
            let active = Rc::new(Cell::new(0u32));
            let (timed_in, active_in) = (Rc::clone(&timed), Rc::clone(&active));
            let timed_poller =
                poller_register("timed", Some(Duration::from_millis(10)), move || {
                    timed_in.set(timed_in.get() + 1);
                    PollStatus::Busy
                })
                .unwrap();
            let active_poller = poller_register("active", None, move || {
                active_in.set(active_in.get() + 1);
                PollStatus::Idle
            })
            .unwrap();
            spool_reactor::sleep(Duration::from_millis(105)).await;
            drop(timed_poller);
            drop(active_poller);
            let after = (timed.get(), active.get());
            spool_reactor::sleep(Duration::from_millis(30)).await;
            assert_eq!(
                (timed.get(), active.get()),
                after,
                "dropped pollers no longer run"
            );
            after
        })
        .unwrap();
    assert!(
        (5..=11).contains(&timed),
        "a 10 ms poller ran {timed} times in 105 ms"
    );
    assert!(
        active > timed,
        "the active poller runs on every pass ({active} vs {timed})"
    );
    runtime.stop();
}

#[test]
fn a_panicking_task_leaves_the_reactor_running() {
    let runtime = two_reactors();
    let crashed = runtime
        .block_on(ReactorId(0), || async {
            let handle = spawn_local(async { panic!("boom (expected by the test)") });
            handle.await
        })
        .unwrap();
    assert!(
        crashed.is_err(),
        "the panicking task's handle reports it was cancelled"
    );
    let still_running = runtime.block_on(ReactorId(0), || async { 41 + 1 }).unwrap();
    assert_eq!(still_running, 42);
    let report = runtime.stop();
    assert!(report.panicked.is_empty());
}

#[test]
fn bad_core_lists_are_refused_with_einval() {
    for cores in [vec![], vec![0, 0], vec![100_000]] {
        let err = Runtime::start(&RuntimeOptions {
            cores: cores.clone(),
            idle: IdleMode::Sleep,
            pin: false,
        })
        .err()
        .expect("refused");
        assert_eq!(err.errno(), -22, "cores {cores:?}: {err}");
    }
}

#[test]
fn busy_mode_runs_and_stops() {
    let runtime = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Busy,
        pin: false,
    })
    .unwrap();
    let value = runtime.block_on(ReactorId(0), || async {
        spool_reactor::sleep(Duration::from_millis(5)).await;
        7
    });
    assert_eq!(value, Ok(7));
    assert_eq!(runtime.stop().leaked_channels, 0);
}

#[test]
fn a_task_woken_by_another_runtime_runs_on_its_own_reactor() {
    // Reactor ids restart at 0 in every runtime: a wake coming from runtime B's reactor 0
    // must reach runtime A's reactor 0 as a message, not B's own run queue.
    let first = Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap();
    let second = Arc::new(
        Runtime::start(&RuntimeOptions {
            cores: vec![0],
            idle: IdleMode::Sleep,
            pin: false,
        })
        .unwrap(),
    );
    let remote = Arc::clone(&second);
    let value = first
        .block_on(ReactorId(0), move || async move {
            let handle = remote
                .spawn_on(ReactorId(0), || async {
                    spool_reactor::sleep(Duration::from_millis(20)).await;
                    7u32
                })
                .unwrap();
            handle.await.unwrap() + 1
        })
        .unwrap();
    assert_eq!(value, 8);
    assert!(first.stop().panicked.is_empty());
    let second = Arc::try_unwrap(second)
        .ok()
        .expect("only the test holds the second runtime");
    assert!(second.stop().panicked.is_empty());
}

#[test]
fn panicked_tasks_leave_the_live_table() {
    let runtime = two_reactors();
    let (before, after) = runtime
        .block_on(ReactorId(0), || async {
            let before = spool_reactor::stats().unwrap().tasks;
            for _ in 0..10 {
                let _ = spawn_local(async { panic!("boom (expected by the test)") }).await;
            }
            spool_reactor::yield_now().await;
            (before, spool_reactor::stats().unwrap().tasks)
        })
        .unwrap();
    assert_eq!(after, before, "no panicked task stays in the live table");
    runtime.stop();
}

#[test]
fn stop_cancels_thousands_of_tasks_and_frees_their_channels() {
    let runtime = two_reactors();
    let device: IoDevice<()> = IoDevice::register("held", |_| Ok(()), |_, _| {});
    let spawner = device.clone();
    runtime
        .block_on(ReactorId(0), move || async move {
            for _ in 0..3000 {
                let channel = spawner.get_channel().unwrap();
                drop(spawn_local(async move {
                    let _channel = channel;
                    std::future::pending::<()>().await;
                }));
            }
        })
        .unwrap();
    assert_eq!(runtime.live_channels(), 1, "3000 handles share one channel");
    let report = runtime.stop();
    assert_eq!(report.leaked_channels, 0);
}
