//! Review of issue 16 (cancellation and panic safety): cases the fix does not cover.
//! Each test fails on the code as reviewed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use spool_reactor::{
    spawn_local, IdleMode, IoDevice, ReactorError, ReactorId, Runtime, RuntimeOptions,
};

fn runtime(cores: Vec<usize>) -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores,
        idle: IdleMode::Sleep,
        pin: false,
    })
    .expect("runtime starts")
}

/// Panics when dropped while armed.
struct PanicOnDrop {
    armed: bool,
}

impl Drop for PanicOnDrop {
    fn drop(&mut self) {
        if self.armed && !std::thread::panicking() {
            panic!("review16: a destructor panicked");
        }
    }
}

/// Runs test `name` of this binary in a child process with `REVIEW16_CHILD` set; returns
/// its exit status and stderr.
fn run_child(name: &str) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("current exe");
    let output = std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("REVIEW16_CHILD", "1")
        .output()
        .expect("child runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn is_child() -> bool {
    std::env::var_os("REVIEW16_CHILD").is_some()
}

/// Finding: a task cancelled at stop whose future panics in its destructor aborts the whole
/// process (async-task drops a cancelled future under `abort_on_panic`). The panic policy
/// says a panic in a task is contained and logged; a drop at stop is not.
#[test]
fn review16_a_task_future_panicking_on_drop_at_stop_aborts_the_process() {
    if is_child() {
        let rt = runtime(vec![0]);
        rt.send_msg(ReactorId(0), || {
            spawn_local(async move {
                let _guard = PanicOnDrop { armed: true };
                std::future::pending::<()>().await;
            });
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let report = rt.stop();
        eprintln!("child: stop report {report:?}");
        assert!(report.panicked.is_empty(), "a reactor died at stop");
        return;
    }
    let (status, stderr) =
        run_child("review16_a_task_future_panicking_on_drop_at_stop_aborts_the_process");
    assert!(
        status.success(),
        "the child process did not survive a task destructor panicking at stop: {status:?}\n{stderr}"
    );
}

/// Finding: `IoDevice::unregister` returns Ok while a channel's destroy callback is still
/// running on its reactor: the holder is removed before `destroy` runs. A caller that tears
/// down what the contexts use after a successful unregister races the destroy.
#[test]
fn review16_unregister_succeeds_while_a_channel_destroy_is_still_running() {
    let rt = runtime(vec![0]);
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let destroyed = Arc::new(AtomicBool::new(false));
    let (d_entered, d_release, d_destroyed) = (
        Arc::clone(&entered),
        Arc::clone(&release),
        Arc::clone(&destroyed),
    );
    let device: IoDevice<u32> = IoDevice::register(
        "held-destroy",
        |_| Ok(1),
        move |_, _| {
            d_entered.wait();
            d_release.wait();
            d_destroyed.store(true, Ordering::SeqCst);
        },
    );
    let on_reactor = device.clone();
    rt.send_msg(ReactorId(0), move || {
        let channel = on_reactor.get_channel().expect("channel");
        drop(channel);
    })
    .unwrap();
    entered.wait();
    let unregistered = device.unregister();
    let destroy_done = destroyed.load(Ordering::SeqCst);
    release.wait();
    let _ = rt.stop();
    assert!(
        unregistered.is_err() || destroy_done,
        "unregister returned {unregistered:?} while the channel's destroy callback was still running"
    );
}

/// Finding: a task that panics with a payload whose destructor panics kills its reactor: the
/// payload is kept as the task's output and dropped by `TaskSet::reap_finished` (with the
/// task table borrowed), outside any containment; `contain` leaks such payloads on purpose on
/// the other paths. The awaiting task gets `Cancelled`, the reactor thread is gone.
#[test]
fn review16_a_task_panic_payload_panicking_on_drop_kills_the_reactor() {
    let rt = runtime(vec![0]);
    let handle = rt
        .spawn_on(ReactorId(0), || async {
            let inner = spawn_local(async {
                std::panic::panic_any(PanicOnDrop { armed: true });
            });
            let _ = inner.await;
            7u32
        })
        .unwrap();
    let value = handle.wait();
    let report = rt.stop();
    assert!(
        report.panicked.is_empty() && value == Ok(7),
        "a task panic payload panicking on drop: value {value:?}, stop report {report:?}"
    );
}

#[allow(dead_code)]
fn _unused(_: ReactorError) {}
