//! Goal: a simulation is a pure function of its seed. Method: run a workload with messages
//! between reactors, timers, timed pollers and seeded "device" latencies twice with one seed
//! and compare traces; a second seed must give a different interleaving. Also checks virtual
//! time (a 1 s sleep takes no wall time) and the channel walk under simulation.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_reactor::{
    now_ns, poller_register, reactor_id, send_msg, sim_rng_u64, sleep, spawn_on, trace, IoDevice,
    PollStatus, ReactorId, Sim, SimOptions, TraceEvent,
};

/// A workload touching every source of nondeterminism the simulation must control.
fn workload(seed: u64) -> (Vec<TraceEvent>, Vec<(u32, u32)>) {
    let mut sim = Sim::new(SimOptions { seed, reactors: 3 });
    let log: Arc<Mutex<Vec<(u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
    let log_in = Arc::clone(&log);
    sim.block_on(ReactorId(0), move || async move {
        let mut handles = Vec::new();
        for reactor in 0..3u32 {
            let log = Arc::clone(&log_in);
            handles.push(
                spawn_on(ReactorId(reactor), move || async move {
                    let ticks = Rc::new(Cell::new(0u32));
                    let ticks_in = Rc::clone(&ticks);
                    let _poller =
                        poller_register("tick", Some(Duration::from_micros(7)), move || {
                            ticks_in.set(ticks_in.get() + 1);
                            PollStatus::Busy
                        })
                        .unwrap();
                    for op in 0..20u32 {
                        // A seeded "device latency", then a message to a neighbour.
                        let latency_ns = sim_rng_u64().unwrap() % 5_000;
                        sleep(Duration::from_nanos(latency_ns)).await;
                        let me = reactor_id().unwrap().0;
                        let log = Arc::clone(&log);
                        send_msg(ReactorId((me + 1) % 3), move || {
                            trace(|| format!("op {me}.{op} arrives"));
                            log.lock().unwrap().push((me, op));
                        })
                        .unwrap();
                    }
                    ticks.get()
                })
                .unwrap(),
            );
        }
        for handle in handles {
            assert!(
                handle.await.unwrap() > 0,
                "the timed poller ran in virtual time"
            );
        }
    })
    .unwrap();
    sim.run_until_quiescent();
    let trace = sim.trace();
    let report = sim.stop();
    assert_eq!(report.leaked_channels, 0);
    let log = log.lock().unwrap().clone();
    (trace, log)
}

#[test]
fn same_seed_same_trace() {
    let (first_trace, first_log) = workload(42);
    let (second_trace, second_log) = workload(42);
    assert!(
        first_trace.len() > 100,
        "the workload produced a real trace ({})",
        first_trace.len()
    );
    assert_eq!(first_log.len(), 60, "every message arrived");
    assert_eq!(first_trace, second_trace, "seed 42 replays exactly");
    assert_eq!(first_log, second_log);
}

#[test]
fn different_seeds_interleave_differently() {
    let (trace_a, log_a) = workload(1);
    let (trace_b, log_b) = workload(2);
    assert_eq!(log_a.len(), log_b.len());
    assert_ne!(trace_a, trace_b, "two seeds gave the same interleaving");
}

#[test]
fn virtual_time_passes_without_wall_time() {
    let mut sim = Sim::new(SimOptions {
        seed: 7,
        reactors: 1,
    });
    let started = std::time::Instant::now();
    let elapsed_ns = sim
        .block_on(ReactorId(0), || async {
            let start = now_ns();
            sleep(Duration::from_secs(1)).await;
            now_ns() - start
        })
        .unwrap();
    assert!(
        elapsed_ns >= 1_000_000_000,
        "virtual sleep ended early: {elapsed_ns} ns"
    );
    assert!(
        elapsed_ns < 1_001_000_000,
        "virtual sleep overshot: {elapsed_ns} ns"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "virtual time should not take wall time"
    );
}

#[test]
fn a_stalled_simulation_reports_instead_of_hanging() {
    let mut sim = Sim::new(SimOptions {
        seed: 3,
        reactors: 2,
    });
    let result = sim.block_on(ReactorId(1), std::future::pending::<()>);
    let err = result.unwrap_err();
    assert_eq!(err.errno(), -libc_etimedout(), "{err}");
}

fn libc_etimedout() -> i32 {
    110
}

#[test]
fn simulated_walk_visits_each_channel_once_and_stop_destroys_all() {
    let mut sim = Sim::new(SimOptions {
        seed: 11,
        reactors: 4,
    });
    let destroyed = Arc::new(AtomicUsize::new(0));
    let destroyed_in = Arc::clone(&destroyed);
    let device: IoDevice<Cell<u32>> = IoDevice::register(
        "cells",
        |_| Ok(Cell::new(0)),
        move |_, cell| {
            assert_eq!(
                cell.get(),
                1,
                "each channel was visited exactly once before destroy"
            );
            destroyed_in.fetch_add(1, Ordering::SeqCst);
        },
    );
    // Reactors 1..=3 hold channels (parked forever); reactor 0 walks.
    for reactor in 1..4 {
        let device = device.clone();
        sim.spawn_on(ReactorId(reactor), move || async move {
            let _channel = device.get_channel().unwrap();
            std::future::pending::<()>().await;
        })
        .unwrap();
    }
    let walk_device = device.clone();
    let (order, origin) = sim
        .block_on(ReactorId(0), move || async move {
            while walk_device.channel_holders().len() < 3 {
                spool_reactor::yield_now().await;
            }
            let order = Arc::new(Mutex::new(Vec::new()));
            let order_in = Arc::clone(&order);
            walk_device
                .for_each_channel(move |reactor, cell| {
                    cell.set(cell.get() + 1);
                    order_in.lock().unwrap().push(reactor.0);
                    Ok(())
                })
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            let order = order.lock().unwrap().clone();
            (order, reactor_id().unwrap())
        })
        .unwrap();
    assert_eq!(order, vec![1, 2, 3]);
    assert_eq!(origin, ReactorId(0));
    assert_eq!(sim.live_channels(), 3);
    let report = sim.stop();
    assert_eq!(report.leaked_channels, 0);
    assert_eq!(destroyed.load(Ordering::SeqCst), 3);
}

mod seeds {
    //! Goal: for any seed, the simulation delivers every message exactly once, in order per
    //! sender, and replays identically. Method: proptest picks seeds and reactor counts.

    use super::*;
    use proptest::prelude::*;

    fn run(seed: u64, reactors: u32) -> (Vec<TraceEvent>, Vec<(u32, u32)>) {
        let mut sim = Sim::new(SimOptions {
            seed,
            reactors: reactors as usize,
        });
        let log: Arc<Mutex<Vec<(u32, u32)>>> = Arc::new(Mutex::new(Vec::new()));
        for sender in 0..reactors {
            let log = Arc::clone(&log);
            sim.spawn_on(ReactorId(sender), move || async move {
                for seq in 0..25u32 {
                    let log = Arc::clone(&log);
                    send_msg(ReactorId((sender + 1) % reactors), move || {
                        log.lock().unwrap().push((sender, seq))
                    })
                    .unwrap();
                    if sim_rng_u64().unwrap().is_multiple_of(3) {
                        sleep(Duration::from_nanos(sim_rng_u64().unwrap() % 2_000)).await;
                    }
                }
            })
            .unwrap();
        }
        sim.run_until_quiescent();
        let log = log.lock().unwrap().clone();
        (sim.trace(), log)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn every_seed_delivers_in_order_and_replays(seed in any::<u64>(), reactors in 1u32..5) {
            let (trace, log) = run(seed, reactors);
            prop_assert_eq!(log.len() as u32, 25 * reactors);
            let mut next = vec![0u32; reactors as usize];
            for (sender, seq) in &log {
                prop_assert_eq!(*seq, next[*sender as usize], "sender {} out of order", sender);
                next[*sender as usize] += 1;
            }
            let (again, again_log) = run(seed, reactors);
            prop_assert_eq!(trace, again);
            prop_assert_eq!(log, again_log);
        }
    }
}

#[test]
fn a_dropped_sleep_cancels_its_timer() {
    let mut sim = Sim::new(SimOptions {
        seed: 21,
        reactors: 1,
    });
    let timers = sim
        .block_on(ReactorId(0), || async {
            let mut long = Box::pin(sleep(Duration::from_secs(3600)));
            // Register the timer, then drop the sleep before it fires.
            let waker = std::task::Waker::noop();
            let mut context = std::task::Context::from_waker(waker);
            assert!(long.as_mut().poll(&mut context).is_pending());
            assert_eq!(spool_reactor::stats().unwrap().timers, 1);
            drop(long);
            spool_reactor::stats().unwrap().timers
        })
        .unwrap();
    assert_eq!(timers, 0, "the dropped sleep's timer is gone");
    sim.run_until_quiescent();
    assert!(
        sim.now_ns() < 1_000_000_000,
        "virtual time never jumped to the dropped deadline ({} ns)",
        sim.now_ns()
    );
}
