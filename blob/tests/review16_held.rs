//! Issue 16, second review, follow-up: the held requests of dropped blob I/O (a write dropped
//! while its bdev request is on the device) are waited for by each step that says "nothing of
//! this blob (store) is still on the device": the blob's last close, and `unload` / `destroy`
//! for a write dropped only after its blob was closed (a live write is not the close's to
//! wait for; once dropped, the store still counts it).

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{buf_of, malloc, poll_once, run_bounded};
use spool_blob::{Blobstore, InitOptions};
use spool_reactor::{Sim, SimOptions};

/// Waits (polling, in virtual time) for a message on `rx`; false if the sender went away.
async fn wait_for(rx: &Mutex<Receiver<()>>) -> bool {
    loop {
        match rx.lock().unwrap().try_recv() {
            Ok(()) => return true,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        spool_reactor::sleep(Duration::from_micros(20)).await;
    }
}

/// A write to thick blob A dropped once submitted (its channel kept by its reactor), then
/// A's last handle closed: when `close` returns Ok, the write is on the device, not still to
/// land (a delete next would free its cluster under it).
#[test]
fn review16_last_close_waits_for_a_dropped_write() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in 0..8u64 {
        for on_md in [true, false] {
            let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
            let reactors = sim.reactors();
            let (md, other) = (reactors[0], reactors[1]);
            let on = if on_md { md } else { other };
            let (bdev, desc) = malloc(32 << 20);
            let probe = Arc::clone(&bdev);
            let handle = sim
                .spawn_on(md, move || async move {
                    let store = Blobstore::init(desc, &InitOptions::default())
                        .await
                        .map_err(|err| err.to_string())?;
                    let cluster_size = store.geometry().cluster_size;
                    let id = common::create_thick(&store, 2).await;
                    let blob = store.open_blob(id).await.map_err(|err| err.to_string())?;
                    let device_at = (u64::from(blob.cluster_map()[1]) * cluster_size) as usize;
                    let units_per_cluster = blob.num_io_units() / blob.num_clusters();
                    let io = blob.io();
                    let (keep_tx, keep_rx) = channel::<()>();
                    let keep_rx = Mutex::new(keep_rx);
                    let dropped = spool_reactor::spawn_on(on, move || async move {
                        let channel = io.channel().expect("channel");
                        let mut write =
                            Box::pin(channel.write(&io, units_per_cluster, buf_of(&[0xAA; 4096])));
                        if poll_once(write.as_mut()) {
                            return false;
                        }
                        drop(write);
                        wait_for(&keep_rx).await;
                        drop(channel);
                        true
                    })
                    .map_err(|err| err.to_string())?;
                    spool_reactor::sleep(Duration::from_micros(1)).await;
                    let closed = blob.close().await;
                    let at_return = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                    spool_reactor::sleep(Duration::from_millis(5)).await;
                    let later = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                    let _ = keep_tx.send(());
                    let dropped = dropped.await.map_err(|err| err.to_string())?;
                    store
                        .unload()
                        .await
                        .map_err(|err| format!("unload: {err}"))?;
                    Ok::<_, String>(dropped.then_some((closed.is_ok(), at_return, later)))
                })
                .unwrap();
            let what = format!(
                "seed {seed}, write dropped on the {} reactor",
                if on_md { "metadata" } else { "I/O" }
            );
            let outcome = run_bounded(&mut sim, &handle, 5_000_000);
            sim.stop();
            match outcome {
                None => failures.push(format!("{what}: the scenario never finished")),
                Some(Err(err)) => failures.push(format!("{what}: {err}")),
                Some(Ok(None)) => {}
                Some(Ok(Some((ok, at_return, later)))) => {
                    runs += 1;
                    if !ok {
                        failures.push(format!("{what}: close failed"));
                    } else if !at_return && later {
                        failures.push(format!(
                            "{what}: close returned Ok while the dropped write was still on the \
                             device; it landed after"
                        ));
                    }
                }
            }
        }
    }
    assert!(runs > 0, "no run dropped the write in flight");
    assert!(failures.is_empty(), "{runs} runs:\n{}", failures.join("\n"));
}

/// A write to thick blob A still pending (its future held) when A's last handle is closed,
/// so the close has nothing of its own to wait for, and dropped only then, while on the
/// device: `unload` or `destroy` right after must not return Ok while it may still land.
#[test]
fn review16_teardown_waits_for_a_write_dropped_after_its_blob_was_closed() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in 0..8u64 {
        for destroy in [false, true] {
            for on_md in [true, false] {
                let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
                let reactors = sim.reactors();
                let (md, other) = (reactors[0], reactors[1]);
                let on = if on_md { md } else { other };
                let (bdev, desc) = malloc(32 << 20);
                let probe = Arc::clone(&bdev);
                let io_probe = Arc::clone(&bdev);
                let handle = sim
                    .spawn_on(md, move || async move {
                        let store = Blobstore::init(desc, &InitOptions::default())
                            .await
                            .map_err(|err| err.to_string())?;
                        let cluster_size = store.geometry().cluster_size;
                        let id = common::create_thick(&store, 2).await;
                        let blob = store.open_blob(id).await.map_err(|err| err.to_string())?;
                        let device_at = (u64::from(blob.cluster_map()[1]) * cluster_size) as usize;
                        let units_per_cluster = blob.num_io_units() / blob.num_clusters();
                        let io = blob.io();
                        let (submitted_tx, submitted_rx) = channel::<bool>();
                        let (closed_tx, closed_rx) = channel::<()>();
                        let (dropped_tx, dropped_rx) = channel::<bool>();
                        let (keep_tx, keep_rx) = channel::<()>();
                        let (closed_rx, keep_rx) = (Mutex::new(closed_rx), Mutex::new(keep_rx));
                        let task = spool_reactor::spawn_on(on, move || async move {
                            let channel = io.channel().expect("channel");
                            let mut write = Box::pin(channel.write(
                                &io,
                                units_per_cluster,
                                buf_of(&[0xAA; 4096]),
                            ));
                            let completed = poll_once(write.as_mut());
                            let _ = submitted_tx.send(!completed);
                            if completed {
                                return;
                            }
                            wait_for(&closed_rx).await;
                            // Still on the device? Only then does dropping it leave it held.
                            let landed =
                                io_probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                            let held = !landed && !poll_once(write.as_mut());
                            drop(write);
                            let _ = dropped_tx.send(held);
                            wait_for(&keep_rx).await;
                            drop(channel);
                        })
                        .map_err(|err| err.to_string())?;
                        let submitted = loop {
                            if let Ok(submitted) = submitted_rx.try_recv() {
                                break submitted;
                            }
                            spool_reactor::sleep(Duration::from_micros(1)).await;
                        };
                        blob.close().await.map_err(|err| format!("close: {err}"))?;
                        let _ = closed_tx.send(());
                        if !submitted {
                            task.await.map_err(|err| err.to_string())?;
                            return Ok(None);
                        }
                        let held = loop {
                            if let Ok(held) = dropped_rx.try_recv() {
                                break held;
                            }
                            spool_reactor::sleep(Duration::from_micros(1)).await;
                        };
                        let done = if destroy {
                            store.destroy().await
                        } else {
                            store.unload().await
                        };
                        let at_return =
                            probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                        spool_reactor::sleep(Duration::from_millis(5)).await;
                        let later = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                        let _ = keep_tx.send(());
                        task.await.map_err(|err| err.to_string())?;
                        Ok::<_, String>(held.then_some((done.is_ok(), at_return, later)))
                    })
                    .unwrap();
                let what = format!(
                    "seed {seed}, {}, write dropped on the {} reactor",
                    if destroy { "destroy" } else { "unload" },
                    if on_md { "metadata" } else { "I/O" }
                );
                let outcome = run_bounded(&mut sim, &handle, 5_000_000);
                sim.stop();
                match outcome {
                    None => failures.push(format!("{what}: the scenario never finished")),
                    Some(Err(err)) => failures.push(format!("{what}: {err}")),
                    Some(Ok(None)) => {}
                    Some(Ok(Some((ok, at_return, later)))) => {
                        runs += 1;
                        if !ok {
                            failures.push(format!("{what}: the teardown failed"));
                        } else if !at_return && later {
                            failures.push(format!(
                                "{what}: returned Ok while the write dropped after the close was \
                                 still on the device; it landed after"
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        runs > 0,
        "no run dropped the write in flight after the close"
    );
    assert!(failures.is_empty(), "{runs} runs:\n{}", failures.join("\n"));
}
