//! The cut harness the review tests share: each cut point is tried with deterministic
//! subsets of the pending writes (all, none, each single write alone, and all but each).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, CrashBdev};
use spool_blob::{Blobstore, LoadOptions};
use spool_reactor::{Sim, SimOptions};

use super::{base_image, check, Ids};

pub type Op = fn(Blobstore, Ids) -> Pin<Box<dyn Future<Output = ()>>>;

#[derive(Clone, Copy, Debug)]
pub enum Keep {
    All,
    None,
    Only(usize),
    AllBut(usize),
}

/// Runs `op` on a copy of `base`, cutting after its `k`-th write with subset `keep`.
/// Returns the image, the op's write count, and the number of pending writes at the cut.
pub fn run_op(base: &[u8], ids: Ids, op: Op, k: Option<u64>, keep: Keep) -> (Vec<u8>, u64, usize) {
    let bdev = Arc::new(CrashBdev::from_image("crash", 4096, base).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    let mut sim = Sim::new(SimOptions {
        seed: 11,
        reactors: 1,
    });
    let reactor = sim.reactors()[0];
    let start = Arc::new(AtomicU64::new(u64::MAX));
    let started = Arc::clone(&start);
    let probe = Arc::clone(&bdev);
    let handle = sim
        .spawn_on(reactor, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .unwrap();
            started.store(probe.completed_writes(), Ordering::SeqCst);
            op(store.clone(), ids).await;
            store.unload().await.unwrap();
        })
        .unwrap();
    let mut cut = None;
    let mut pending_count = 0;
    loop {
        let base_count = start.load(Ordering::SeqCst);
        if let Some(k) = k {
            if base_count != u64::MAX && bdev.completed_writes() >= base_count + k {
                let pending: Vec<u64> = bdev.pending_writes().iter().map(|w| w.index).collect();
                pending_count = pending.len();
                cut = Some(bdev.cut_power(|w| {
                    let pos = pending.iter().position(|&i| i == w.index).unwrap();
                    match keep {
                        Keep::All => true,
                        Keep::None => false,
                        Keep::Only(i) => pos == i,
                        Keep::AllBut(i) => pos != i,
                    }
                }));
                break;
            }
        }
        if handle.try_take().is_some() {
            break;
        }
        if !sim.step() {
            break;
        }
    }
    let writes =
        bdev.completed_writes() - start.load(Ordering::SeqCst).min(bdev.completed_writes());
    sim.stop();
    let image = cut.unwrap_or_else(|| bdev.cut_power_keep_all());
    (image, writes, pending_count)
}

pub static LAST_PANIC: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Keeps the messages of panics on any thread (a check panics inside its simulation, which
/// reports only `Panicked(reactor)`).
pub fn record_panics() {
    std::panic::set_hook(Box::new(|info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        if !text.contains("failing cut(s)") && !text.contains("Panicked(") {
            LAST_PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(text.clone());
        }
        eprintln!("panic: {text}");
    }));
}

pub fn panic_text(_panic: Box<dyn std::any::Any + Send>) -> String {
    let mut seen = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
    let text = seen
        .iter()
        .find(|t| !t.contains("Panicked("))
        .cloned()
        .unwrap_or_default();
    seen.clear();
    text
}

/// Every cut point, every deterministic subset; returns the failures.
pub fn crash_failures(name: &str, op: Op, extra: fn(Vec<u8>, Ids, &str)) -> Vec<String> {
    record_panics();
    let (base, ids) = base_image();
    let (complete, writes, _) = run_op(&base, ids, op, None, Keep::All);
    check(complete.clone(), ids, &format!("{name}: completed"));
    extra(complete, ids, &format!("{name}: completed"));
    let mut failures = Vec::new();
    for k in 0..writes {
        let (_, _, pending) = run_op(&base, ids, op, Some(k), Keep::All);
        let mut keeps = vec![Keep::All, Keep::None];
        for i in 0..pending {
            keeps.push(Keep::Only(i));
            keeps.push(Keep::AllBut(i));
        }
        for keep in keeps {
            let (image, _, _) = run_op(&base, ids, op, Some(k), keep);
            let what = format!("{name}: cut after write {k} ({pending} pending), keep {keep:?}");
            LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let outcome = std::panic::catch_unwind(|| {
                check(image.clone(), ids, &what);
                extra(image, ids, &what);
            });
            if let Err(panic) = outcome {
                failures.push(panic_text(panic));
            }
        }
    }
    failures
}

pub fn no_extra(_: Vec<u8>, _: Ids, _: &str) {}

pub fn assert_none(name: &str, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{name}: {} failing cut(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
