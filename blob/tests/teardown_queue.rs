//! Teardowns one at a time (docs/blob.md, "Dropped metadata operations"): an unload or
//! destroy whose caller dropped its future still runs, and a teardown called meanwhile waits
//! for it, then does what the table in the doc says: after an unload, a second unload gets
//! -ENODEV and a destroy still wipes; after a destroy, an unload gets -ENODEV and a destroy
//! gets Ok. Each case checks the result, that nothing wrote to the device after the second
//! call returned, and what a fresh load of the image finds.

mod cancel;
mod common;

use std::sync::Arc;
use std::time::Duration;

use cancel::{poll_then_drop, Polled};
use common::{malloc, run_bounded};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::{Sim, SimOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Teardown {
    Unload,
    Destroy,
}

impl Teardown {
    async fn run(self, store: Blobstore) -> spool_blob::Result<()> {
        match self {
            Teardown::Unload => store.unload().await,
            Teardown::Destroy => store.destroy().await,
        }
    }
}

/// Blob count of a fresh load of `image`, `None` if it does not load as a store.
fn loaded_blobs(image: &[u8]) -> Option<usize> {
    let (_, desc) = common::from_image(image);
    let mut sim = Sim::new(SimOptions {
        seed: 1,
        reactors: 1,
    });
    let md = sim.reactors()[0];
    let handle = sim
        .spawn_on(md, move || async move {
            match Blobstore::load(desc, &LoadOptions::default()).await {
                Ok((store, _)) => {
                    let blobs = store.blob_ids().len();
                    store.unload().await.ok()?;
                    Some(blobs)
                }
                Err(_) => None,
            }
        })
        .unwrap();
    let loaded = run_bounded(&mut sim, &handle, 2_000_000).flatten();
    sim.stop();
    loaded
}

#[test]
fn teardown_called_while_an_abandoned_one_runs_waits_for_it() {
    // (first, second, the second's errno (0: Ok), whether the device loads after).
    let cases = [
        (Teardown::Unload, Teardown::Unload, -libc::ENODEV, true),
        (Teardown::Unload, Teardown::Destroy, 0, false),
        (Teardown::Destroy, Teardown::Unload, -libc::ENODEV, false),
        (Teardown::Destroy, Teardown::Destroy, 0, false),
    ];
    let mut failures = Vec::new();
    for (first, second, errno, loads) in cases {
        let mut runs = 0;
        for seed in 0..4u64 {
            let mut sim = Sim::new(SimOptions { seed, reactors: 1 });
            let md = sim.reactors()[0];
            let (bdev, desc) = malloc(32 << 20);
            let probe = Arc::clone(&bdev);
            let handle = sim
                .spawn_on(md, move || async move {
                    let store = Blobstore::init(desc, &InitOptions::default())
                        .await
                        .map_err(|err| err.to_string())?;
                    let _ = common::create_thick(&store, 2).await;
                    let seen =
                        poll_then_drop(first.run(store.clone()), 1, Duration::from_millis(500))
                            .await;
                    if let Polled::Completed(_) = seen {
                        return Ok(None);
                    }
                    let result = second.run(store).await;
                    let at_return = probe.snapshot();
                    spool_reactor::sleep(Duration::from_millis(50)).await;
                    let later = probe.snapshot();
                    Ok::<_, String>(Some((
                        result.map_err(|err| err.errno()).err().unwrap_or(0),
                        at_return == later,
                        later,
                    )))
                })
                .unwrap();
            let what = format!("{first:?} dropped, then {second:?}, seed {seed}");
            let outcome = run_bounded(&mut sim, &handle, 5_000_000);
            sim.stop();
            let (got, unchanged, image) = match outcome {
                Some(Ok(Some(outcome))) => outcome,
                Some(Ok(None)) => continue,
                other => {
                    failures.push(format!("{what}: {:?}", other.map(|r| r.map(|_| ()))));
                    continue;
                }
            };
            runs += 1;
            if got != errno {
                failures.push(format!("{what}: errno {got}, {errno} expected"));
            }
            if !unchanged {
                failures.push(format!("{what}: the device changed after it returned"));
            }
            match (loaded_blobs(&image), loads) {
                (Some(1), true) | (None, false) => {}
                (found, _) => failures.push(format!(
                    "{what}: a fresh load finds {found:?} blob(s); it should {}load",
                    if loads { "" } else { "not " }
                )),
            }
        }
        if runs == 0 {
            failures.push(format!(
                "{first:?} then {second:?}: the first never stayed running"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
