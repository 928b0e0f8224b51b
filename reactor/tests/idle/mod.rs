//! What the idle-mode tests share (`adaptive.rs`, `adaptive_review.rs`, `interrupt.rs`): a
//! runtime on unpinned cores, a question to a reactor that fails instead of hanging when the
//! reactor never wakes, and a reactor let go to sleep.

#![allow(dead_code)] // each test binary uses a subset

use std::time::Duration;

use spool_reactor::{wakeup_counts, IdleMode, ReactorId, Runtime, RuntimeOptions};

/// How long a reactor may take to answer before the test calls the wake-up lost.
pub const REPLY_WAIT: Duration = Duration::from_secs(10);

/// A runtime of `cores` reactors (cores 0..cores, unpinned) idling in `idle` mode.
pub fn runtime(idle: IdleMode, cores: usize) -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: (0..cores).collect(),
        idle,
        pin: false,
    })
    .expect("runtime starts")
}

/// Runs `f` on `reactor` and returns its result, or None if no reply came within
/// [`REPLY_WAIT`] (a reactor that never woke).
pub fn ask<T: Send + 'static>(
    runtime: &Runtime,
    reactor: ReactorId,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (sender, receiver) = crossbeam_channel::bounded(1);
    runtime
        .send_msg(reactor, move || {
            let _ = sender.send(f());
        })
        .expect("send");
    receiver.recv_timeout(REPLY_WAIT).ok()
}

/// Fails the test without stopping a runtime whose reactor may never wake (stopping it
/// would hang instead of failing).
pub fn fail_without_stop(runtime: Runtime, why: &str) -> ! {
    std::mem::forget(runtime);
    panic!("{why}");
}

/// (sleeps, doorbell rings) of `reactor`, read on it; fails the test if it never answers.
pub fn counts(runtime: Runtime, reactor: ReactorId) -> (Runtime, (u64, u64)) {
    match ask(&runtime, reactor, wakeup_counts) {
        Some(counts) => (runtime, counts),
        None => fail_without_stop(runtime, "a sleeping reactor did not answer a message"),
    }
}

/// Lets `reactor` go idle and sleep (it sleeps once idle for 50 µs; 30 ms is ample), fails
/// the test if it did not, then leaves it asleep.
pub fn let_it_sleep(runtime: Runtime, reactor: ReactorId) -> Runtime {
    let (runtime, (before, _)) = counts(runtime, reactor);
    std::thread::sleep(Duration::from_millis(30));
    let (runtime, (after, _)) = counts(runtime, reactor);
    if after <= before {
        fail_without_stop(runtime, "the adaptive reactor did not sleep while idle");
    }
    std::thread::sleep(Duration::from_millis(30));
    runtime
}
