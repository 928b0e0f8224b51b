//! Issue 16, third review: findings, each a test that failed before its fix.

mod common;

use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{malloc, poll_once, run_bounded};
use spool_bdev::{Bdev, BdevDesc, ErrorBdev, ErrorRule, IoKind};
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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    WriteZeroes,
    /// write_zeroes on a device that refuses it (-ENOTSUP): zero-filled writes instead.
    WriteZeroesFallback,
    Unmap,
}

/// Finding 1: an unmap or write_zeroes of an allocated cluster of blob A, dropped once its
/// bdev request is on the device, then A's last handle closed. The request was counted in
/// the blob's in-flight I/O only by the future's own guard, never held (reads and writes
/// are): `close` returned Ok while the zeros were still to land, so a delete next frees the
/// cluster and the zeros land on whatever blob gets it (data corruption).
fn dropped_zeroing_then_close(op: Op) {
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
            let faulty = Arc::new(ErrorBdev::new("faulty", Arc::clone(&bdev) as Arc<dyn Bdev>));
            faulty.add_rule(ErrorRule::new(-libc::ENOTSUP).kinds(&[IoKind::WriteZeroes]));
            let seen = Arc::clone(&faulty);
            let desc = if op == Op::WriteZeroesFallback {
                BdevDesc::open(faulty as Arc<dyn Bdev>).expect("open")
            } else {
                desc
            };
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
                    let (dropped_tx, dropped_rx) = channel::<bool>();
                    let dropped = spool_reactor::spawn_on(on, move || async move {
                        let channel = io.channel().expect("channel");
                        common::write(&channel, &io, units_per_cluster, &[0xAA; 4096]).await;
                        let completed = match op {
                            Op::WriteZeroes => {
                                let mut zero =
                                    Box::pin(channel.write_zeroes(&io, units_per_cluster, 1));
                                poll_once(zero.as_mut())
                            }
                            Op::WriteZeroesFallback => {
                                // Polled until its zero-filled write is submitted.
                                let writes = seen.seen_count(IoKind::Write);
                                let mut zero =
                                    Box::pin(channel.write_zeroes(&io, units_per_cluster, 1));
                                loop {
                                    if poll_once(zero.as_mut()) {
                                        break true;
                                    }
                                    if seen.seen_count(IoKind::Write) > writes {
                                        break false;
                                    }
                                    spool_reactor::sleep(Duration::from_nanos(100)).await;
                                }
                            }
                            Op::Unmap => {
                                let mut unmap = Box::pin(channel.unmap(&io, units_per_cluster, 1));
                                poll_once(unmap.as_mut())
                            }
                        };
                        let _ = dropped_tx.send(!completed);
                        if completed {
                            return false;
                        }
                        wait_for(&keep_rx).await;
                        drop(channel);
                        true
                    })
                    .map_err(|err| err.to_string())?;
                    // The zeroing submitted and its future dropped (or completed) first.
                    let in_flight = loop {
                        if let Ok(in_flight) = dropped_rx.try_recv() {
                            break in_flight;
                        }
                        spool_reactor::sleep(Duration::from_micros(1)).await;
                    };
                    let closed = blob.close().await;
                    let zeros = |probe: &spool_bdev::MallocBdev| {
                        probe.snapshot()[device_at..device_at + 4096] == [0u8; 4096]
                    };
                    let at_return = zeros(&probe);
                    spool_reactor::sleep(Duration::from_millis(5)).await;
                    let later = zeros(&probe);
                    let _ = keep_tx.send(());
                    let dropped = dropped.await.map_err(|err| err.to_string())?;
                    store
                        .unload()
                        .await
                        .map_err(|err| format!("unload: {err}"))?;
                    Ok::<_, String>((dropped && in_flight).then_some((
                        closed.is_ok(),
                        at_return,
                        later,
                    )))
                })
                .unwrap();
            let what = format!(
                "seed {seed}, {op:?} dropped on the {} reactor",
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
                            "{what}: close returned Ok while the dropped request was still on \
                             the device; its zeros landed after"
                        ));
                    }
                }
            }
        }
    }
    assert!(runs > 0, "no run dropped the request in flight");
    assert!(failures.is_empty(), "{runs} runs:\n{}", failures.join("\n"));
}

#[test]
fn review16c_last_close_waits_for_a_dropped_write_zeroes() {
    dropped_zeroing_then_close(Op::WriteZeroes);
}

#[test]
fn review16c_last_close_waits_for_a_dropped_unmap() {
    dropped_zeroing_then_close(Op::Unmap);
}

#[test]
fn review16c_last_close_waits_for_a_dropped_write_zeroes_fallback() {
    dropped_zeroing_then_close(Op::WriteZeroesFallback);
}
