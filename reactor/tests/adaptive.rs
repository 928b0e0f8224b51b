//! Goal: an adaptive reactor (`IdleMode::Adaptive`) that has gone to sleep in the kernel
//! wakes for everything that can give it work: a message from a non-reactor thread, a task
//! woken from another thread, its own timers, and a registered wake source whose poller
//! reports `Armed`. Method: one reactor, idle long enough to be asleep (its sleep count says
//! so), then the event; a lost wake-up shows as the reply never arriving within seconds
//! (the reactor sleeps with no timeout when it has no timer). A failing test forgets the
//! runtime instead of stopping it, so it fails instead of hanging on a reactor that sleeps.

mod idle;

use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use idle::{ask, counts, fail_without_stop, let_it_sleep, runtime, REPLY_WAIT};
use spool_reactor::{
    poller_register, sleep, wake_source_register, wakeup_counts, IdleMode, PollStatus, WakeKind,
};

#[test]
fn a_message_from_another_thread_wakes_a_sleeping_reactor() {
    let runtime = runtime(IdleMode::Adaptive, 1);
    let reactor = runtime.reactors()[0];
    let runtime = let_it_sleep(runtime, reactor);
    let (runtime, (_, rings_before)) = counts(runtime, reactor);
    std::thread::sleep(Duration::from_millis(30));
    if ask(&runtime, reactor, || ()).is_none() {
        fail_without_stop(runtime, "a message to a sleeping reactor was not handled");
    }
    let (runtime, (_, rings)) = counts(runtime, reactor);
    // The message and the last counts() each found the reactor asleep and rang.
    assert!(
        rings >= rings_before + 2,
        "the message was handled without a doorbell ring: the reactor was not asleep \
         ({rings_before} rings before, {rings} after)"
    );
    runtime.stop();
}

/// A future that completes once `flag` is set, parking its waker where another thread can
/// take it.
struct Flagged {
    state: Arc<Mutex<(bool, Option<Waker>)>>,
}

impl Future for Flagged {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.lock().expect("state");
        if state.0 {
            Poll::Ready(())
        } else {
            state.1 = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

#[test]
fn a_task_woken_from_another_thread_runs_on_a_sleeping_reactor() {
    let runtime = runtime(IdleMode::Adaptive, 1);
    let reactor = runtime.reactors()[0];
    let state = Arc::new(Mutex::new((false, None::<Waker>)));
    let task_state = Arc::clone(&state);
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let spawned = ask(&runtime, reactor, move || {
        // Dropping the handle detaches the task.
        drop(spool_reactor::spawn_local(async move {
            Flagged { state: task_state }.await;
            let _ = sender.send(());
        }));
    });
    if spawned.is_none() {
        fail_without_stop(runtime, "a sleeping reactor did not take a message");
    }
    let runtime = let_it_sleep(runtime, reactor);
    let waker = {
        let mut guard = state.lock().expect("state");
        guard.0 = true;
        guard.1.take()
    };
    waker.expect("the task parked its waker").wake();
    if receiver.recv_timeout(REPLY_WAIT).is_err() {
        fail_without_stop(runtime, "a task woken from another thread never ran");
    }
    runtime.stop();
}

#[test]
fn timers_fire_on_a_sleeping_reactor() {
    let runtime = runtime(IdleMode::Adaptive, 1);
    let reactor = runtime.reactors()[0];
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let spawned = ask(&runtime, reactor, move || {
        // Dropping the handle detaches the task.
        drop(spool_reactor::spawn_local(async move {
            let started = Instant::now();
            for _ in 0..5 {
                sleep(Duration::from_millis(20)).await;
            }
            let _ = sender.send((started.elapsed(), wakeup_counts().0));
        }));
    });
    if spawned.is_none() {
        fail_without_stop(runtime, "a sleeping reactor did not take a message");
    }
    let Ok((elapsed, sleeps)) = receiver.recv_timeout(REPLY_WAIT) else {
        fail_without_stop(runtime, "timers on an adaptive reactor never fired");
    };
    assert!(
        elapsed >= Duration::from_millis(100),
        "timers fired early: {elapsed:?}"
    );
    assert!(
        sleeps >= 5,
        "the reactor spun through its timers instead of sleeping: {sleeps} sleeps"
    );
    runtime.stop();
}

/// A poller waiting for a byte on a socket reports `Armed` (its socket is a wake source):
/// the reactor sleeps, and the byte written from another thread wakes it.
#[test]
fn an_armed_poller_wakes_the_reactor_through_its_wake_source() {
    let runtime = runtime(IdleMode::Adaptive, 1);
    let reactor = runtime.reactors()[0];
    let (mut writer, reader) = UnixStream::pair().expect("socket pair");
    reader.set_nonblocking(true).expect("nonblocking");
    let (sender, receiver) = crossbeam_channel::bounded(1);
    let registered = ask(&runtime, reactor, move || {
        let source = wake_source_register(reader.as_raw_fd(), WakeKind::Readable)
            .expect("register")
            .expect("an adaptive reactor takes wake sources");
        let mut reader = reader;
        let mut source = Some(source);
        let poller = poller_register("test-socket", None, move || {
            let mut byte = [0u8; 1];
            match reader.read(&mut byte) {
                Ok(1) => {
                    source.take();
                    let _ = sender.send(byte[0]);
                    PollStatus::Busy
                }
                _ if source.is_some() => PollStatus::Armed,
                _ => PollStatus::Idle,
            }
        })
        .expect("poller");
        poller.detach();
    })
    .is_some();
    if !registered {
        fail_without_stop(runtime, "a sleeping reactor did not take a message");
    }
    let runtime = let_it_sleep(runtime, reactor);
    writer.write_all(&[0x5a]).expect("write");
    match receiver.recv_timeout(REPLY_WAIT) {
        Ok(byte) => assert_eq!(byte, 0x5a),
        Err(_) => fail_without_stop(runtime, "the wake source did not wake the reactor"),
    }
    runtime.stop();
}
