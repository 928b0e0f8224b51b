//! Review of issue 16 (cancellation): the detached work a dropped blob future leaves running
//! racing with what its caller does next. Each test fails on the code as reviewed.

mod cancel;
mod common;

use std::sync::Arc;
use std::time::Duration;

use cancel::{poll_then_drop, Polled};
use common::{buf_of, create_thin, malloc, pattern};
use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_blob::{Blobstore, InitOptions, LoadOptions};
use spool_reactor::{RemoteHandle, Sim, SimOptions};

fn run_bounded<T>(sim: &mut Sim, handle: &RemoteHandle<T>, steps: u64) -> Option<T> {
    for _ in 0..steps {
        if let Some(result) = handle.try_take() {
            return Some(result.expect("the scenario task failed"));
        }
        if !sim.step() {
            break;
        }
    }
    handle
        .try_take()
        .map(|result| result.expect("the scenario task failed"))
}

fn loaded_free(image: Vec<u8>) -> u64 {
    let bdev = Arc::new(MallocBdev::from_image("count", 4096, &image).unwrap());
    let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
    let mut sim = Sim::new(SimOptions {
        seed: 1,
        reactors: 1,
    });
    let md = sim.reactors()[0];
    let handle = sim
        .spawn_on(md, move || async move {
            let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let free = store.free_cluster_count();
            store.unload().await.map_err(|e| e.to_string())?;
            Ok::<u64, String>(free)
        })
        .unwrap();
    let free = run_bounded(&mut sim, &handle, 2_000_000)
        .expect("load finishes")
        .expect("load");
    sim.stop();
    free
}

/// A thin first write dropped after `polls` polls (its allocation goes on as a detached
/// task), then at once the blob closed and deleted: every cluster must be free again, in
/// memory and on a fresh load, and the store must unload.
#[test]
fn review16_thin_write_dropped_then_blob_closed_and_deleted_keeps_cluster_counts() {
    let mut failures = Vec::new();
    for seed in 0..4u64 {
        for on_md in [true, false] {
            for polls in 1usize..=6 {
                let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
                let reactors = sim.reactors();
                let (md, other) = (reactors[0], reactors[1]);
                let on = if on_md { md } else { other };
                let (bdev, desc) = malloc(32 << 20);
                let handle = sim
                    .spawn_on(md, move || async move {
                        let store = Blobstore::init(desc, &InitOptions::default())
                            .await
                            .map_err(|err| err.to_string())?;
                        let free_before = store.free_cluster_count();
                        let id = create_thin(&store, 4).await;
                        let blob = store.open_blob(id).await.map_err(|err| err.to_string())?;
                        let io = blob.io();
                        let completed = spool_reactor::spawn_on(on, move || async move {
                            let channel = io.channel().expect("channel");
                            let write = channel.write(&io, 256, buf_of(&pattern(1, 4096)));
                            matches!(
                                poll_then_drop(write, polls, Duration::from_millis(500)).await,
                                Polled::Completed(_)
                            )
                        })
                        .map_err(|err| err.to_string())?
                        .await
                        .map_err(|err| err.to_string())?;
                        let closed = blob.close().await.map_err(|err| format!("close: {err}"));
                        let deleted = store
                            .delete_blob(id)
                            .await
                            .map_err(|err| format!("delete: {err}"));
                        spool_reactor::sleep(Duration::from_millis(100)).await;
                        let free_after = store.free_cluster_count();
                        let open = store.open_blob_count();
                        let unloaded = store.unload().await.map_err(|err| format!("unload: {err}"));
                        Ok::<_, String>((
                            completed,
                            closed,
                            deleted,
                            free_before,
                            free_after,
                            open,
                            unloaded,
                        ))
                    })
                    .unwrap();
                let what = format!(
                    "seed {seed}, write on the {} reactor dropped after {polls} poll(s)",
                    if on_md { "metadata" } else { "I/O" }
                );
                let Some(outcome) = run_bounded(&mut sim, &handle, 5_000_000) else {
                    failures.push(format!("{what}: the scenario never finished"));
                    sim.stop();
                    continue;
                };
                sim.stop();
                let (completed, closed, deleted, before, after, open, unloaded) = match outcome {
                    Ok(outcome) => outcome,
                    Err(err) => {
                        failures.push(format!("{what}: {err}"));
                        continue;
                    }
                };
                if completed {
                    break;
                }
                let loaded = loaded_free(bdev.snapshot());
                if closed.is_err() || deleted.is_err() || unloaded.is_err() || open != 0 {
                    failures.push(format!(
                        "{what}: close {closed:?}, delete {deleted:?}, unload {unloaded:?}, {open} open"
                    ));
                }
                if after != before || loaded != before {
                    failures.push(format!(
                        "{what}: free clusters {before} before, {after} in memory after the delete, {loaded} on a fresh load"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A write to an allocated cluster of thick blob A, dropped after its first poll (the bdev
/// request is submitted; its buffer is parked in the slot until the device completes), gives
/// its in-flight count back at the drop (`DirectIo`'s `Admitted` guard). `freeze` promises
/// "after this returns, no I/O of the blob is in flight", and snapshot, resize and merge
/// change the cluster map on that promise; but a freeze right after the drop drains at once
/// while the write is still on the device, and the write lands after the freeze-protected
/// operation returned. (With a shrink, the sync that follows frees the cluster while the
/// write is still queued; on a device with a deep queue it can land after another blob
/// reused the cluster. The simulated malloc device's unmap at release happened to run
/// after it here, so that corruption was not reproduced.)
/// Checked: when `resize` (a freeze/unfreeze around the map change) returns, no write of
/// the blob issued before it is still to land.
#[test]
fn review16_freeze_returns_while_a_dropped_write_is_still_on_the_device() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in 0..8u64 {
        let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
        let md = sim.reactors()[0];
        let (bdev, desc) = malloc(32 << 20);
        let probe = Arc::clone(&bdev);
        let handle = sim
            .spawn_on(md, move || async move {
                let store = Blobstore::init(desc, &InitOptions::default())
                    .await
                    .map_err(|err| err.to_string())?;
                let cluster_size = store.geometry().cluster_size;
                let a_id = common::create_thick(&store, 2).await;
                let a = store.open_blob(a_id).await.map_err(|err| err.to_string())?;
                let units_per_cluster = a.num_io_units() / a.num_clusters();
                let device_at = (u64::from(a.cluster_map()[1]) * cluster_size) as usize;
                let a_io = a.io();
                let channel = a_io.channel().map_err(|err| err.to_string())?;
                // W1: 4 KiB of 0xAA at A's cluster 1, dropped once submitted.
                let w1 = channel.write(&a_io, units_per_cluster, buf_of(&[0xAA; 4096]));
                if let Polled::Completed(_) =
                    poll_then_drop(w1, 1, Duration::from_millis(500)).await
                {
                    return Ok(None);
                }
                a.resize(3).await.map_err(|err| format!("resize: {err}"))?;
                let at_return = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                spool_reactor::sleep(Duration::from_millis(5)).await;
                let later = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                drop(channel);
                a.close().await.map_err(|err| err.to_string())?;
                store.unload().await.map_err(|err| err.to_string())?;
                Ok::<_, String>(Some((at_return, later)))
            })
            .unwrap();
        let outcome = run_bounded(&mut sim, &handle, 5_000_000);
        sim.stop();
        match outcome {
            None => failures.push(format!("seed {seed}: the scenario never finished")),
            Some(Err(err)) => failures.push(format!("seed {seed}: {err}")),
            Some(Ok(None)) => {}
            Some(Ok(Some((at_return, later)))) => {
                runs += 1;
                if !at_return && later {
                    failures.push(format!(
                        "seed {seed}: resize's freeze returned while A's dropped write was still on the \
                         device; it landed after the map change"
                    ));
                }
            }
        }
    }
    assert!(runs > 0, "no run dropped the write in flight");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// As above, for a write on the split path: 8 KiB across the boundary of A's clusters 0
/// and 1 (physically contiguous on a thick blob: one device request made by the split
/// path's own future), dropped once submitted. Its `Admitted` count goes with the future; the
/// device write must stay counted until the device completes it.
#[test]
fn review16_freeze_waits_for_a_dropped_split_path_write() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in 0..8u64 {
        let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
        let md = sim.reactors()[0];
        let (bdev, desc) = malloc(32 << 20);
        let probe = Arc::clone(&bdev);
        let handle = sim
            .spawn_on(md, move || async move {
                let store = Blobstore::init(desc, &InitOptions::default())
                    .await
                    .map_err(|err| err.to_string())?;
                let cluster_size = store.geometry().cluster_size;
                let a_id = common::create_thick(&store, 2).await;
                let a = store.open_blob(a_id).await.map_err(|err| err.to_string())?;
                let units_per_cluster = a.num_io_units() / a.num_clusters();
                let unit = cluster_size / units_per_cluster;
                let device_at = (u64::from(a.cluster_map()[1]) * cluster_size) as usize;
                let a_io = a.io();
                let channel = a_io.channel().map_err(|err| err.to_string())?;
                let w1 = channel.write(
                    &a_io,
                    units_per_cluster - 4096 / unit,
                    buf_of(&[0xAA; 8192]),
                );
                if let Polled::Completed(_) =
                    poll_then_drop(w1, 1, Duration::from_millis(500)).await
                {
                    return Ok(None);
                }
                a.resize(3).await.map_err(|err| format!("resize: {err}"))?;
                let at_return = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                spool_reactor::sleep(Duration::from_millis(5)).await;
                let later = probe.snapshot()[device_at..device_at + 4096] == [0xAA; 4096];
                drop(channel);
                a.close().await.map_err(|err| err.to_string())?;
                store.unload().await.map_err(|err| err.to_string())?;
                Ok::<_, String>(Some((at_return, later)))
            })
            .unwrap();
        let outcome = run_bounded(&mut sim, &handle, 5_000_000);
        sim.stop();
        match outcome {
            None => failures.push(format!("seed {seed}: the scenario never finished")),
            Some(Err(err)) => failures.push(format!("seed {seed}: {err}")),
            Some(Ok(None)) => {}
            Some(Ok(Some((at_return, later)))) => {
                runs += 1;
                if !at_return && later {
                    failures.push(format!(
                        "seed {seed}: resize's freeze returned while A's dropped split write was \
                         still on the device; it landed after the map change"
                    ));
                }
            }
        }
    }
    assert!(runs > 0, "no run dropped the write in flight");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A thin first write dropped while its allocation is on its way (the claimed cluster's fill
/// on the device), then at once the blob closed and the store unloaded: the unload must not
/// write a free-cluster mask that still counts the claim (a clean store's next load trusts the
/// mask), and nothing may write to the device after the unload returned.
#[test]
fn review16_thin_write_dropped_then_store_unloaded_keeps_cluster_counts() {
    let mut failures = Vec::new();
    let mut runs = 0;
    for seed in 0..4u64 {
        for on_md in [true, false] {
            for polls in 1usize..=4 {
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
                        let id = create_thin(&store, 4).await;
                        let free_before = store.free_cluster_count();
                        let blob = store.open_blob(id).await.map_err(|err| err.to_string())?;
                        let io = blob.io();
                        let completed = spool_reactor::spawn_on(on, move || async move {
                            let channel = io.channel().expect("channel");
                            let write = channel.write(&io, 256, buf_of(&pattern(1, 4096)));
                            matches!(
                                poll_then_drop(write, polls, Duration::from_millis(500)).await,
                                Polled::Completed(_)
                            )
                        })
                        .map_err(|err| err.to_string())?
                        .await
                        .map_err(|err| err.to_string())?;
                        blob.close().await.map_err(|err| format!("close: {err}"))?;
                        store
                            .unload()
                            .await
                            .map_err(|err| format!("unload: {err}"))?;
                        let at_unload = probe.snapshot();
                        spool_reactor::sleep(Duration::from_millis(50)).await;
                        let later = probe.snapshot();
                        Ok::<_, String>((completed, free_before, id, at_unload == later, later))
                    })
                    .unwrap();
                let what = format!(
                    "seed {seed}, write on the {} reactor dropped after {polls} poll(s)",
                    if on_md { "metadata" } else { "I/O" }
                );
                let outcome = run_bounded(&mut sim, &handle, 5_000_000);
                sim.stop();
                let (completed, free_before, id, unchanged, image) = match outcome {
                    None => {
                        failures.push(format!("{what}: the scenario never finished"));
                        continue;
                    }
                    Some(Err(err)) => {
                        failures.push(format!("{what}: {err}"));
                        continue;
                    }
                    Some(Ok(outcome)) => outcome,
                };
                if completed {
                    break;
                }
                runs += 1;
                // A fresh load: the free count must equal the clusters no blob owns.
                let bdev = Arc::new(MallocBdev::from_image("after", 4096, &image).unwrap());
                let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
                let mut sim = Sim::new(SimOptions {
                    seed: 1,
                    reactors: 1,
                });
                let md = sim.reactors()[0];
                let handle = sim
                    .spawn_on(md, move || async move {
                        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                            .await
                            .map_err(|e| e.to_string())?;
                        let free = store.free_cluster_count();
                        let blob = store.open_blob(id).await.map_err(|e| e.to_string())?;
                        let allocated = blob.num_allocated_clusters();
                        blob.close().await.map_err(|e| e.to_string())?;
                        store.unload().await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((free, allocated))
                    })
                    .unwrap();
                let loaded = run_bounded(&mut sim, &handle, 2_000_000);
                sim.stop();
                match loaded {
                    Some(Ok((free, allocated))) => {
                        if free + allocated != free_before {
                            failures.push(format!(
                                "{what}: after the unload a fresh load has {free} free clusters and the blob {allocated} \
                                 allocated; {free_before} were free before the write"
                            ));
                        }
                    }
                    other => failures.push(format!("{what}: reload: {other:?}")),
                }
                if !unchanged {
                    failures.push(format!("{what}: the device changed after unload returned"));
                }
            }
        }
    }
    assert!(runs > 0, "no run dropped the write in flight");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

type MdOp = fn(Blobstore, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// A metadata operation whose caller dropped its future (after `polls` polls) runs on as a
/// detached task; `unload` right after must either wait for it or refuse: it must not write
/// clean = 1 and the masks while that task still changes metadata, nor may anything write
/// to the device after `unload` returned. Checked: the device does not change after the
/// unload, and a fresh load of the image as it was when `unload` returned (the process may
/// exit right then, killing the detached task) has a free count equal to the clusters no
/// blob owns.
#[test]
fn review16_md_op_dropped_then_unload_leaves_a_consistent_clean_store() {
    let ops: Vec<(&str, MdOp)> = vec![
        ("create_blob", |store, _| {
            Box::pin(async move {
                let _ = store
                    .create_blob(&spool_blob::BlobOptions {
                        num_clusters: 3,
                        ..spool_blob::BlobOptions::default()
                    })
                    .await;
            })
        }),
        ("delete_blob", |store, id| {
            Box::pin(async move {
                let _ = store.delete_blob(id).await;
            })
        }),
        ("open_blob", |store, id| {
            Box::pin(async move {
                let _ = store.open_blob(id).await;
            })
        }),
        ("create_snapshot", |store, id| {
            Box::pin(async move {
                let _ = store.create_snapshot(id, &[]).await;
            })
        }),
    ];
    let mut failures = Vec::new();
    for (name, op) in ops {
        for seed in 0..3u64 {
            for polls in 1usize..=12 {
                let mut sim = Sim::new(SimOptions { seed, reactors: 2 });
                let md = sim.reactors()[0];
                let (bdev, desc) = malloc(32 << 20);
                let probe = Arc::clone(&bdev);
                let handle = sim
                    .spawn_on(md, move || async move {
                        let store = Blobstore::init(desc, &InitOptions::default())
                            .await
                            .map_err(|err| err.to_string())?;
                        let id = common::create_thick(&store, 2).await;
                        let seen = poll_then_drop(
                            op(store.clone(), id),
                            polls,
                            Duration::from_millis(500),
                        )
                        .await;
                        let completed = matches!(seen, Polled::Completed(_));
                        let unloaded = store.unload().await.map_err(|err| err.to_string());
                        let at_unload = probe.snapshot();
                        spool_reactor::sleep(Duration::from_millis(50)).await;
                        let later = probe.snapshot();
                        Ok::<_, String>((completed, unloaded, at_unload == later, at_unload))
                    })
                    .unwrap();
                let what = format!("{name}, seed {seed}, dropped after {polls} poll(s)");
                let outcome = run_bounded(&mut sim, &handle, 5_000_000);
                sim.stop();
                let (completed, unloaded, unchanged, image) = match outcome {
                    Some(Ok(outcome)) => outcome,
                    other => {
                        failures.push(format!(
                            "{what}: {:?}",
                            other.map(|r| r.map(|o| (o.0, o.1, o.2)))
                        ));
                        continue;
                    }
                };
                if unloaded.is_err() {
                    // Refused (busy): acceptable; nothing to check on disk.
                    if completed {
                        break;
                    }
                    continue;
                }
                if !unchanged {
                    failures.push(format!("{what}: the device changed after unload returned"));
                }
                let bdev = Arc::new(MallocBdev::from_image("after", 4096, &image).unwrap());
                let desc = BdevDesc::open(bdev as Arc<dyn Bdev>).unwrap();
                let mut sim2 = Sim::new(SimOptions {
                    seed: 1,
                    reactors: 1,
                });
                let md2 = sim2.reactors()[0];
                let handle = sim2
                    .spawn_on(md2, move || async move {
                        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
                            .await
                            .map_err(|e| e.to_string())?;
                        let free = store.free_cluster_count();
                        let total = store.total_data_cluster_count();
                        let mut owned = 0;
                        for id in store.blob_ids() {
                            let blob = store.open_blob(id).await.map_err(|e| e.to_string())?;
                            owned += blob.num_allocated_clusters();
                            blob.close().await.map_err(|e| e.to_string())?;
                        }
                        store.unload().await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((free, total, owned))
                    })
                    .unwrap();
                let loaded = run_bounded(&mut sim2, &handle, 2_000_000);
                sim2.stop();
                match loaded {
                    Some(Ok((free, total, owned))) => {
                        if free + owned != total {
                            failures.push(format!(
                                "{what}: a fresh load has {free} free + {owned} owned of {total} clusters"
                            ));
                        }
                    }
                    other => failures.push(format!("{what}: reload: {other:?}")),
                }
                if completed {
                    break;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
