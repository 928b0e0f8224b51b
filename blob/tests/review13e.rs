//! Fifth review of issue 13 (`review13e`): pinned extent pages of half-made snapshots, the
//! load-time removal of a snapshot never taken, and the checker. Each test names the
//! sequence it drives and what it expects. Run with
//! `cargo test -p spool-blob --test review13e`.

mod common;
mod support;

use std::sync::Arc;

use common::{buf_of, pattern, run, runtime};
use spool_bdev::{Bdev, BdevDesc, ErrorBdev, ErrorRule, IoKind, MallocBdev};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions, LoadOptions};

const CLUSTER: u64 = 64 << 10;

/// What reading a blob gave: its bytes, or why not.
type Read = Result<Vec<u8>, String>;
const DEVICE: u64 = 16 << 20;

/// Byte range of the md page that is the root of blob `id`.
fn root_range(store: &Blobstore, id: u64) -> std::ops::Range<u64> {
    let page = (id & 0xffff_ffff) + store.geometry().md_start;
    page * 4096..(page + 1) * 4096
}

/// A fresh store on a malloc device behind an error injector.
fn faulty() -> (Arc<MallocBdev>, Arc<ErrorBdev>, BdevDesc) {
    let bdev = Arc::new(MallocBdev::new("r13e", 4096, DEVICE / 4096).unwrap());
    let errors = Arc::new(ErrorBdev::new(
        "r13e-faulty",
        Arc::clone(&bdev) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&errors) as Arc<dyn Bdev>).unwrap();
    (bdev, errors, desc)
}

async fn init(desc: BdevDesc) -> Blobstore {
    Blobstore::init(
        desc,
        &InitOptions {
            cluster_size: CLUSTER,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap()
}

/// A thin table-form blob of 2 clusters with cluster 0 written (pattern 7): one extent page.
async fn thin_written(store: &Blobstore) -> u64 {
    let id = store
        .create_blob(&BlobOptions {
            num_clusters: 2,
            thin: true,
            form: ExtentForm::Table,
            ..BlobOptions::default()
        })
        .await
        .unwrap();
    let blob = store.open_blob(id).await.unwrap();
    let channel = store.channel().unwrap();
    let (result, _) = channel
        .write(&blob.io(), 0, buf_of(&pattern(7, CLUSTER as usize)))
        .await;
    result.unwrap();
    channel.flush().await.unwrap();
    blob.close().await.unwrap();
    id
}

/// Regression guard (passes): a thin table-form blob O with one extent page E; a snapshot
/// S1 of O fails on one flush (each of the first seven tried), and S1's removal fails too
/// (S1 held, half-made, on disk naming E); a second snapshot S2 of O succeeds; kill -9.
/// A failed persist marks O's extent pages dirty, so O's next root moves E to a new page
/// before S2 takes the map: the load's removal of S1 (never taken) frees E, which only S1
/// names. Expected: after the load, O reads back its cluster 0. (The failure path that
/// did not mark them dirty is `a_pinned_page_a_second_snapshot_takes_is_lost_...` below.)
#[test]
fn guard_a_failed_snapshots_page_moves_before_a_second_snapshot_takes_it() {
    // Dry run: the id S1 will get (allocation is deterministic).
    let rt = runtime();
    let (_bdev, _errors, desc) = faulty();
    let s1_id = run(&rt, move || async move {
        let store = init(desc).await;
        let o = thin_written(&store).await;
        let s = store.create_snapshot(o, &[]).await.unwrap();
        std::mem::forget(store);
        s
    });
    let mut broken = Vec::new();
    let mut reached = 0;
    for nth_flush in 1..8u64 {
        let (bdev, errors, desc) = faulty();
        let (o, s2, outcome) = run(&rt, move || async move {
            let store = init(desc).await;
            let o = thin_written(&store).await;
            // One flush of the first snapshot fails.
            errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Flush])
                    .nth(nth_flush),
            );
            // S1's root: written at its create and with its map; every later write (its
            // removal, the retries) fails.
            let mut s1_rules = Vec::new();
            for n in 3..40 {
                s1_rules.push(
                    errors.add_rule(
                        ErrorRule::new(-libc::EIO)
                            .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                            .range_bytes(root_range(&store, s1_id))
                            .nth(n),
                    ),
                );
            }
            let _fired = |errors: &ErrorBdev| -> u64 {
                s1_rules
                    .iter()
                    .map(|&r| errors.rule_stats(r).unwrap().injected)
                    .sum()
            };
            let first = store.create_snapshot(o, &[]).await;
            let s2 = store.create_snapshot(o, &[]).await;
            let flushed = store.channel().unwrap().flush().await;
            let outcome = format!("first: {first:?}, second: {s2:?}, flush: {flushed:?}");
            let s1_held = store.blob_ids().contains(&s1_id);
            std::mem::forget(store); // kill -9
            match (first, s2, flushed, s1_held) {
                (Err(_), Ok(s2), Ok(()), true) => (o, Some(s2), outcome),
                _ => (o, None, outcome),
            }
        });
        let Some(s2) = s2 else {
            continue; // not the sequence wanted
        };
        reached += 1;
        let image = bdev.snapshot();
        let (_copy, loaded) = common::from_image(&image);
        let (report, back, s2_map) = run(&rt, move || async move {
            let (store, report) = Blobstore::load(loaded, &LoadOptions::default())
                .await
                .unwrap();
            let s2_map = match store.open_blob(s2).await {
                Ok(blob) => {
                    let map = blob.cluster_map();
                    blob.close().await.unwrap();
                    Ok(map)
                }
                Err(err) => Err(err.to_string()),
            };
            let back = match store.open_blob(o).await {
                Ok(blob) => read_cluster0(&store, &blob).await,
                Err(err) => Err(err.to_string()),
            };
            std::mem::forget(store);
            (format!("{:?}", report.repaired), back, s2_map)
        });
        let ok = matches!(&back, Ok(data) if *data == pattern(7, CLUSTER as usize));
        if !ok {
            broken.push(format!(
                "flush #{nth_flush} failed: {outcome}; S1 {s1_id:#x}, S2 {s2:#x}; the load: {report}; S2's map after it: {s2_map:?}; O's cluster 0 reads {}",
                match &back {
                    Ok(data) if data.iter().all(|&b| b == 0) => "zeros".to_string(),
                    Ok(_) => "other data".to_string(),
                    Err(err) => format!("an error: {err}"),
                }
            ));
        }
    }
    rt.stop();
    assert!(reached > 0, "no flush failure left S1 held and S2 made");
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Reads blob `blob`'s first cluster.
async fn read_cluster0(store: &Blobstore, blob: &spool_blob::Blob) -> Result<Vec<u8>, String> {
    let channel = store.channel().unwrap();
    let (result, buf) = channel
        .read(
            &blob.io(),
            0,
            spool_bdev::DmaBuf::alloc(CLUSTER as usize).unwrap(),
        )
        .await;
    result.map(|()| buf.to_vec()).map_err(|e| e.to_string())
}

/// What `spool check` says of `image` (one line per problem).
fn check_problems(image: &[u8]) -> Vec<String> {
    let cell = std::cell::RefCell::new(image.to_vec());
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).expect("the check runs");
    checked
        .report
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// A dirty image (kill -9) holding a thin table-form blob O (cluster 0 = pattern 7) and a
/// half-made snapshot S1 of it whose map (O's clusters and extent page) is on disk: O's
/// thin root write failed, and so did every removal of S1. Returns the image, O and S1.
fn half_made_image() -> (Vec<u8>, u64, u64) {
    let rt = runtime();
    let (_bdev, _errors, desc) = faulty();
    let s1 = run(&rt, move || async move {
        let store = init(desc).await;
        let o = thin_written(&store).await;
        let s = store.create_snapshot(o, &[]).await.unwrap();
        std::mem::forget(store);
        s
    });
    let (bdev, errors, desc) = faulty();
    let o = run(&rt, move || async move {
        let store = init(desc).await;
        let o = thin_written(&store).await;
        errors.add_rule(
            ErrorRule::new(-libc::EIO)
                .kinds(&[IoKind::Write])
                .range_bytes(root_range(&store, o))
                .nth(1),
        );
        for n in 3..40 {
            errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                    .range_bytes(root_range(&store, s1))
                    .nth(n),
            );
        }
        let first = store.create_snapshot(o, &[]).await;
        assert!(first.is_err(), "the snapshot fails: {first:?}");
        assert!(store.blob_ids().contains(&s1), "S1 is held");
        store.channel().unwrap().flush().await.unwrap();
        std::mem::forget(store); // kill -9
        o
    });
    rt.stop();
    (bdev.snapshot(), o, s1)
}

/// Loads `image`, reads O's cluster 0, then unloads cleanly: (the load's repairs, the
/// blob ids, O's cluster 0, the clean image).
fn load_read_unload(image: &[u8], o: u64) -> (Vec<String>, Vec<u64>, Read, Vec<u8>) {
    let rt = runtime();
    let (bdev, desc) = common::from_image(image);
    let out = run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let back = match store.open_blob(o).await {
            Ok(blob) => {
                let back = read_cluster0(&store, &blob).await;
                blob.close().await.unwrap();
                back
            }
            Err(err) => Err(err.to_string()),
        };
        let ids = store.blob_ids();
        store.unload().await.unwrap();
        (report.repaired, ids, back)
    });
    rt.stop();
    (out.0, out.1, out.2, bdev.snapshot())
}

/// Sequence: `half_made_image` (a snapshot interrupted after its map reached the disk and
/// left there by failed removals, then kill -9), then `spool check --repair` (check, repair,
/// the load the CLI runs after it, its clean unload), then `spool check` again.
///
/// Expected: the check names the half-made snapshot and nothing else that a load does not
/// repair; after the repair and the load, O reads back its cluster 0, S1 is gone, and the
/// store checks consistent.
#[test]
fn repair_of_a_dirty_store_with_a_half_made_snapshot_keeps_the_originals_data() {
    let (image, o, s1) = half_made_image();
    let before = check_problems(&image);
    eprintln!("{before:?}");
    assert!(
        before.iter().any(|p| p.starts_with("snapshot_pending")),
        "the check names the half-made snapshot: {before:?}"
    );
    let cell = std::cell::RefCell::new(image.clone());
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
    let repaired = spool_blob::check::repair::repair_image(&cell, &checked).unwrap();
    let repaired_image = cell.into_inner();
    let (loaded, ids, back, clean) = load_read_unload(&repaired_image, o);
    let after = check_problems(&clean);
    let ok = matches!(&back, Ok(data) if *data == pattern(7, CLUSTER as usize));
    assert!(
        ok && !ids.contains(&s1) && after.is_empty(),
        "check before: {before:?}; repair: {repaired:?}; load: {loaded:?}; ids {ids:x?} (S1 {s1:#x}); O's data intact: {ok} ({:?}); check after: {after:?}",
        back.as_ref().map(|d| d.iter().all(|&b| b == 0))
    );
    // The dirty image loaded directly ends the same way.
    let (loaded, ids, back, clean) = load_read_unload(&image, o);
    let after = check_problems(&clean);
    let ok = matches!(&back, Ok(data) if *data == pattern(7, CLUSTER as usize));
    assert!(
        ok && !ids.contains(&s1) && after.is_empty(),
        "direct load: {loaded:?}; ids {ids:x?}; O's data intact: {ok}; check after: {after:?}"
    );
}

/// The base of the corruption sweep: a clean store holding A (thick, run-length form, 2
/// clusters, pattern 1, an xattr), B (thin, table form, 4 clusters, cluster 1 = pattern 2),
/// S (a snapshot of C), C (a clone of S: cluster 0 reads S's pattern 3, cluster 1 its own
/// pattern 4) and D (thick, table form, 1 cluster, pattern 5, enough xattrs for a two-page
/// chain). Returns the image and each blob's full contents by id.
fn sweep_base() -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let rt = runtime();
    let (bdev, desc) = common::malloc(8 << 20);
    let truth = run(&rt, move || async move {
        let store = init(desc).await;
        let channel = store.channel().unwrap();
        let put = |id: u64, cluster: u64, seed: u64| {
            let (store, channel) = (store.clone(), channel.clone());
            async move {
                let blob = store.open_blob(id).await.unwrap();
                let (result, _) = channel
                    .write(
                        &blob.io(),
                        cluster * 16,
                        buf_of(&pattern(seed, CLUSTER as usize)),
                    )
                    .await;
                result.unwrap();
                blob.close().await.unwrap();
            }
        };
        let a = store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                form: ExtentForm::Rle,
                xattrs: vec![("name".into(), b"a".to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        put(a, 0, 1).await;
        put(a, 1, 11).await;
        let b = store
            .create_blob(&BlobOptions {
                num_clusters: 4,
                thin: true,
                form: ExtentForm::Table,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        put(b, 1, 2).await;
        let c = store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                form: ExtentForm::Table,
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        put(c, 0, 3).await;
        put(c, 1, 33).await;
        let _s = store.create_snapshot(c, &[]).await.unwrap();
        put(c, 1, 4).await;
        let d = store
            .create_blob(&BlobOptions {
                num_clusters: 1,
                form: ExtentForm::Table,
                xattrs: (0..40)
                    .map(|i| (format!("xattr-{i:03}"), vec![i as u8; 120]))
                    .collect(),
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        put(d, 0, 5).await;
        channel.flush().await.unwrap();
        let mut truth = Vec::new();
        for id in store.blob_ids() {
            let blob = store.open_blob(id).await.unwrap();
            let len = blob.num_clusters() * CLUSTER;
            let data = common::read(&channel, &blob.io(), 0, len as usize).await;
            blob.close().await.unwrap();
            truth.push((id, data));
        }
        store.unload().await.unwrap();
        truth
    });
    rt.stop();
    (bdev.snapshot(), truth)
}

/// Loads `image`: each blob's size (u64 LE) then its first 2 MiB at most, by id, or why the
/// load or that blob failed.
fn contents(rt: &spool_reactor::Runtime, image: &[u8]) -> Result<Vec<(u64, Read)>, String> {
    let (_bdev, desc) = common::from_image(image);
    run(rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .map_err(|e| format!("load: {e}"))?;
        let channel = store.channel().unwrap();
        let cluster = store.cluster_size();
        let mut out = Vec::new();
        for id in store.blob_ids() {
            let data = match store.open_blob(id).await {
                Ok(blob) => {
                    let size = blob.num_clusters().saturating_mul(cluster);
                    let len = size.min(2 << 20) as usize;
                    let (result, buf) = if len == 0 {
                        (Ok(()), spool_bdev::DmaBuf::alloc(4096).unwrap())
                    } else {
                        channel
                            .read(&blob.io(), 0, spool_bdev::DmaBuf::alloc(len).unwrap())
                            .await
                    };
                    let _ = blob.close().await;
                    result
                        .map(|()| {
                            let mut v = size.to_le_bytes().to_vec();
                            v.extend_from_slice(&buf[..len]);
                            v
                        })
                        .map_err(|e| format!("read: {e}"))
                }
                Err(err) => Err(format!("open: {err}")),
            };
            out.push((id, data));
        }
        let _ = store.unload().await;
        Ok(out)
    })
}

/// Sweep: every byte of every md page in use of `sweep_base`'s clean store, changed (xor
/// 0x01, xor 0x80, 0xff, 0x00) with the page's CRC resealed, i.e. well-formed pages saying
/// something else. For each:
/// - when `spool check` finds nothing, Spool's load lists every blob and each reads back
///   exactly what it held (else the check missed a corruption that matters);
/// - otherwise, after `--repair` (check, repair, load), every blob whose chain and extent
///   pages (and whose ancestors') were not the changed page reads back exactly what it held.
///
/// A tool more than a test: some findings are by design and stay (a thin blob's size, an
/// internal xattr's name such as `SNAP` changed, a descriptor turned into padding: each is
/// well-formed metadata saying something else, which no checker can tell from the truth).
/// At this branch's last commit the base store gives only those; the fixture p1 gave one
/// more (`check_names_an_extent_page_whose_id_is_zero`, fixed). Narrow it with
/// `R13E_PAGE=N`, `R13E_SPAN=BYTES`, `R13E_OPS=0123`; replay one case with
/// `corruption_sweep_one_case` (`R13E_CASE=page,offset,op`).
#[test]
#[ignore = "review13e: a sweep (minutes in a debug build); see the findings it prints"]
fn corruption_sweep_check_names_what_matters_and_repair_keeps_intact_blobs() {
    let (base, _) = sweep_base();
    sweep(&base);
}

/// The same sweep on SPDK's fixtures (`R13E_FIXTURE` names one; default: all).
#[test]
#[ignore = "review13e: a sweep (minutes in a debug build); see the findings it prints"]
fn corruption_sweep_on_spdk_fixtures() {
    let names = match std::env::var("R13E_FIXTURE") {
        Ok(name) => vec![name],
        Err(_) => support::fixtures::fixture_names(),
    };
    for name in names {
        eprintln!("fixture {name}");
        sweep(&support::fixtures::load_image(&name));
    }
}

/// The sweep on `base` (see the test above).
fn sweep(base: &[u8]) {
    let base = base.to_vec();
    let truth = {
        let rt = runtime();
        let truth = contents(&rt, &base).expect("the base loads");
        rt.stop();
        truth
            .into_iter()
            .map(|(id, data)| (id, data.expect("every blob of the base reads")))
            .collect::<Vec<_>>()
    };
    let md_start = u32::from_le_bytes(base[48..52].try_into().unwrap()) as usize;
    let used: Vec<usize> = {
        let cell = std::cell::RefCell::new(base.clone());
        let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
        let _ = &checked;
        // md pages whose header names a blob of the store.
        (0..checked.report.md_len as usize)
            .filter(|&p| {
                let at = (md_start + p) * 4096;
                let id = u64::from_le_bytes(base[at..at + 8].try_into().unwrap());
                truth.iter().any(|(t, _)| *t == id)
            })
            .collect()
    };
    let owner_of = |page: usize| {
        let at = (md_start + page) * 4096;
        u64::from_le_bytes(base[at..at + 8].try_into().unwrap())
    };
    // Clone -> parent, from the base (S is C's parent).
    let parents: std::collections::HashMap<u64, u64> = {
        let cell = std::cell::RefCell::new(base.clone());
        let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
        checked
            .report
            .blobs
            .iter()
            .filter_map(|b| b.parent.map(|p| (b.id, p)))
            .collect()
    };
    let rt = runtime();
    let mut findings = Vec::new();
    let mut cases = 0;
    let only: Option<usize> = std::env::var("R13E_PAGE").ok().and_then(|v| v.parse().ok());
    for &page in &used {
        if only.is_some_and(|p| p != page) {
            continue;
        }
        let at = (md_start + page) * 4096;
        let owner = owner_of(page);
        let last = base[at..at + 4088]
            .iter()
            .rposition(|&b| b != 0)
            .unwrap_or(0)
            .max(24);
        let span: usize = std::env::var("R13E_SPAN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4088);
        let offsets: Vec<usize> = (0..(last + 8).min(4088).min(span))
            .chain(4088..4092)
            .collect();
        let ops: Vec<u8> = std::env::var("R13E_OPS")
            .ok()
            .map(|v| v.bytes().map(|b| b - b'0').collect())
            .unwrap_or_else(|| vec![0, 1, 2, 3]);
        for off in offsets {
            for &op in &ops {
                let mut image = base.clone();
                let byte = &mut image[at + off];
                let new = match op {
                    0 => *byte ^ 0x01,
                    1 => *byte ^ 0x80,
                    2 => 0xff,
                    _ => 0x00,
                };
                if new == *byte {
                    continue;
                }
                *byte = new;
                spool_blob::format::seal_page(&mut image[at..at + 4096]);
                cases += 1;
                let cell = std::cell::RefCell::new(image);
                let Ok(checked) = spool_blob::check::check_image(&cell, &mut |_| {}) else {
                    continue;
                };
                let what = format!("md page {page} (blob {owner:#x}) byte {off} op {op}");
                if checked.report.problems.is_empty() {
                    let image = cell.into_inner();
                    match contents(&rt, &image) {
                        Err(err) => findings.push(format!("{what}: check consistent, {err}")),
                        Ok(found) => {
                            for (id, data) in &truth {
                                match found.iter().find(|(f, _)| f == id) {
                                    None => findings.push(format!("{what}: check consistent, blob {id:#x} not listed")),
                                    Some((_, Err(err))) => findings.push(format!("{what}: check consistent, blob {id:#x}: {err}")),
                                    Some((_, Ok(back))) if back != data => findings.push(format!(
                                        "{what}: check consistent, blob {id:#x} reads other data ({} bytes, was {})",
                                        back.len(),
                                        data.len()
                                    )),
                                    _ => {}
                                }
                            }
                        }
                    }
                    continue;
                }
                if spool_blob::check::repair::repair_image(&cell, &checked).is_err() {
                    continue;
                }
                let image = cell.into_inner();
                let found = match contents(&rt, &image) {
                    Ok(found) => found,
                    Err(err) => {
                        findings.push(format!("{what}: repaired, {err}"));
                        continue;
                    }
                };
                for (id, data) in &truth {
                    let mut chain = vec![*id];
                    while let Some(p) = parents.get(chain.last().unwrap()) {
                        chain.push(*p);
                    }
                    // The page's header names the blob that wrote it; a snapshot's extent
                    // pages are its clone's (SPDK's layout): both ends of the link count.
                    let mut owners = vec![owner];
                    while let Some(p) = parents.get(owners.last().unwrap()) {
                        owners.push(*p);
                    }
                    if chain.contains(&owner) || owners.contains(id) {
                        continue;
                    }
                    match found.iter().find(|(f, _)| f == id) {
                        None => findings.push(format!(
                            "{what}: after repair, intact blob {id:#x} not listed"
                        )),
                        Some((_, Err(err))) => findings
                            .push(format!("{what}: after repair, intact blob {id:#x}: {err}")),
                        Some((_, Ok(back))) if back != data => findings.push(format!(
                            "{what}: after repair, intact blob {id:#x} reads other data"
                        )),
                        _ => {}
                    }
                }
            }
        }
    }
    rt.stop();
    eprintln!("{cases} cases, {} findings", findings.len());
    for finding in findings.iter().take(200) {
        eprintln!("{finding}");
    }
    assert!(
        findings.is_empty(),
        "{} findings (first: {})",
        findings.len(),
        findings[0]
    );
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Bits set in the on-disk mask whose start page the super block holds at `at` (32: md
/// pages, 40: clusters, 72: blob ids): type byte, u32 bit count, then the bits.
fn disk_mask(image: &[u8], at: usize) -> std::collections::BTreeSet<u64> {
    let start = u32_at(image, at) as usize * 4096;
    let bits = u64::from(u32_at(image, start + 1));
    (0..bits)
        .filter(|&bit| image[start + 5 + (bit / 8) as usize] & (1 << (bit % 8)) != 0)
        .collect()
}

/// Sequence: a clean store with thick blobs A, X and Y (2 clusters each, written); the root
/// pages of X and Y get a byte flipped (their CRC fails); `spool check --repair` keeps both
/// as damaged (the trusted clean masks keep their md pages, clusters and blob-id bits) and
/// the store clean: every later load keeps X's clusters. Then the operator gives Y up:
/// `spool delete Y` (`forget_damaged_blob`).
///
/// `forget_damaged_blob` writes the super block dirty before zeroing Y's root, then checks
/// and repairs again: on a dirty store the masks are not trusted, and a root failing its
/// CRC is "simply a damaged page" (a replay skips it), so X's clusters are "not known" and
/// the repair leaves the store dirty (its report says a load frees them). The next load
/// (`spool serve`, any command) replays the metadata and frees X's clusters and blob id:
/// deleting Y gave away X's data, which the clean store kept safe before the delete.
///
/// Expected: after deleting Y, the store is clean as the first repair left it, and a load
/// keeps X's clusters in use.
/// Failed before the fix in this branch (`forget_damaged_blob` on a clean store now clears
/// the blob-id bit instead of writing the store dirty).
#[test]
fn deleting_one_damaged_blob_offline_frees_another_damaged_blobs_clusters() {
    let rt = runtime();
    let (bdev, desc) = common::malloc(8 << 20);
    let (x, y, x_clusters, md_start) = run(&rt, move || async move {
        let store = init(desc).await;
        let channel = store.channel().unwrap();
        let mut ids = Vec::new();
        for seed in 1..=3u64 {
            let id = common::create_thick(&store, 2).await;
            let blob = store.open_blob(id).await.unwrap();
            let (result, _) = channel
                .write(&blob.io(), 0, buf_of(&pattern(seed, 2 * CLUSTER as usize)))
                .await;
            result.unwrap();
            blob.close().await.unwrap();
            ids.push(id);
        }
        let x = store.open_blob(ids[1]).await.unwrap();
        let x_clusters: Vec<u64> = x.cluster_map().into_iter().map(u64::from).collect();
        x.close().await.unwrap();
        let md_start = store.geometry().md_start;
        store.unload().await.unwrap();
        (ids[1], ids[2], x_clusters, md_start)
    });
    rt.stop();
    let mut image = bdev.snapshot();
    for id in [x, y] {
        let at = ((id & 0xffff_ffff) + md_start) as usize * 4096;
        image[at + 20] ^= 0x40; // inside the descriptors: the CRC no longer matches
    }
    let cell = std::cell::RefCell::new(image);
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
    let damaged: Vec<u64> = checked
        .report
        .blobs
        .iter()
        .filter(|b| b.damaged.is_some())
        .map(|b| b.id)
        .collect();
    assert_eq!(damaged, vec![x, y], "the check finds X and Y damaged");
    let repaired = spool_blob::check::repair::repair_image(&cell, &checked).unwrap();
    let x_page = x & 0xffff_ffff;
    let kept = |image: &[u8]| {
        let clusters = disk_mask(image, 40);
        (
            x_clusters.iter().all(|c| clusters.contains(c)),
            disk_mask(image, 32).contains(&x_page),
            disk_mask(image, 72).contains(&x_page),
        )
    };
    assert_eq!(
        kept(&cell.borrow()),
        (true, true, true),
        "the first repair keeps X ({repaired:?})"
    );
    let forgot = spool_blob::check::forget::forget_damaged_blob(&cell, y).unwrap();
    let image = cell.into_inner();
    let clean = u32_at(&image, 16);
    let rt = runtime();
    let (_copy, desc) = common::from_image(&image);
    let used = run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let used = store.used_clusters();
        std::mem::forget(store);
        used
    });
    rt.stop();
    let lost: Vec<u64> = x_clusters
        .iter()
        .copied()
        .filter(|c| !used.contains(c))
        .collect();
    assert!(
        clean == 1 && lost.is_empty(),
        "after deleting Y the store is clean = {clean}, and a load frees X's clusters {lost:?}; forget said {forgot:?}"
    );
}

/// Diagnostic (not a check): one corruption of the sweep, from `R13E_CASE=page,offset,op`:
/// prints the page before and after, the check's report and what a load reads.
#[test]
#[ignore = "review13e: diagnostic for one sweep case"]
fn corruption_sweep_one_case() {
    let Ok(case) = std::env::var("R13E_CASE") else {
        return;
    };
    let parts: Vec<usize> = case.split(',').map(|p| p.parse().unwrap()).collect();
    let (page, off, op) = (parts[0], parts[1], parts[2]);
    let (base, truth) = sweep_base();
    let md_start = u32::from_le_bytes(base[48..52].try_into().unwrap()) as usize;
    let at = (md_start + page) * 4096;
    let mut image = base.clone();
    let byte = &mut image[at + off];
    *byte = match op {
        0 => *byte ^ 0x01,
        1 => *byte ^ 0x80,
        2 => 0xff,
        _ => 0x00,
    };
    spool_blob::format::seal_page(&mut image[at..at + 4096]);
    eprintln!("before: {:02x?}", &base[at..at + 96]);
    eprintln!("after:  {:02x?}", &image[at..at + 96]);
    let cell = std::cell::RefCell::new(image.clone());
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
    for blob in &checked.report.blobs {
        eprintln!("check: {blob:?}");
    }
    for problem in &checked.report.problems {
        eprintln!("problem: {problem}");
    }
    let rt = runtime();
    let found = contents(&rt, &image).unwrap();
    rt.stop();
    for (id, data) in &truth {
        let back = found.iter().find(|(f, _)| f == id).map(|(_, d)| d);
        let same = matches!(back, Some(Ok(b)) if b == data);
        let how = match back {
            Some(Ok(b)) => (0..b.len().max(data.len()) / CLUSTER as usize)
                .map(|c| {
                    let lo = 8 + c * CLUSTER as usize;
                    let hi = lo + CLUSTER as usize;
                    match (b.get(lo..hi), data.get(lo..hi)) {
                        (Some(x), Some(y)) if x == y => "same",
                        (Some(x), _) if x.iter().all(|&v| v == 0) => "zeros",
                        _ => "other",
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
            Some(Err(err)) => err.clone(),
            None => "not listed".into(),
        };
        eprintln!("blob {id:#x}: same {same}: {how}");
    }
}

/// Sequence (found by the corruption sweep: md page 3 byte 45 set to 0xff): the clean base
/// store of the sweep; in the clone C's root page, the type byte of the internal xattr
/// descriptor holding `SNAP` (C's parent, snapshot S) is changed to a type no version of
/// SPDK defines (0xff), and the page resealed. SPDK and Spool skip unknown descriptor types
/// (forward compatibility), so C silently loses its parent: it loads as a thin blob with no
/// parent and reads zeros where it read S's data; S stays, read-only with no clone.
///
/// `spool check` reports the store consistent (no problem, no note): a descriptor type
/// unknown to every SPDK version is not named, though here it is the only trace of a
/// corruption that changed what a blob reads. (A CRC-valid page with a changed byte is what
/// a misdirected or buggy write leaves.)
///
/// Expected: the check names the unknown descriptor type (a problem, or at least a note
/// naming the page), so an operator learns the metadata holds something neither SPDK nor
/// Spool understands.
/// Failed before the fix in this branch (check/chains.rs records unknown descriptors, the
/// check notes them).
#[test]
fn check_names_an_unknown_descriptor_type() {
    let (base, truth) = sweep_base();
    let md_start = u32::from_le_bytes(base[48..52].try_into().unwrap()) as usize;
    // C: the blob with a parent (its root holds the internal xattr SNAP).
    let cell = std::cell::RefCell::new(base.clone());
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
    let c = checked
        .report
        .blobs
        .iter()
        .find(|b| b.parent.is_some())
        .unwrap()
        .id;
    let at = (md_start + (c & 0xffff_ffff) as usize) * 4096;
    // Find the internal xattr descriptor (type 4) whose name is SNAP.
    let page = &base[at..at + 4096];
    let mut off = 16;
    let mut found = None;
    while off + 5 <= 4088 && page[off] != 0 {
        let len = u32_at(page, off + 1) as usize;
        if page[off] == 4 && &page[off + 9..off + 13] == b"SNAP" {
            found = Some(off);
        }
        off += 5 + len;
    }
    let off = found.expect("C's root holds SNAP");
    let mut image = base.clone();
    image[at + off] = 0xff;
    spool_blob::format::seal_page(&mut image[at..at + 4096]);
    let cell = std::cell::RefCell::new(image.clone());
    let checked = spool_blob::check::check_image(&cell, &mut |_| {}).unwrap();
    // What a load reads of C now (the loss the check should point at).
    let rt = runtime();
    let found = contents(&rt, &image).unwrap();
    rt.stop();
    let c_now = found
        .iter()
        .find(|(id, _)| *id == c)
        .map(|(_, d)| d.clone());
    let c_then = truth
        .iter()
        .find(|(id, _)| *id == c)
        .map(|(_, d)| d.clone());
    let changed = c_now.as_ref().map(|r| r.as_ref().ok()) != c_then.as_ref().map(Some);
    let named = checked
        .report
        .problems
        .iter()
        .any(|p| p.page == Some((c & 0xffff_ffff) as u32))
        || checked
            .report
            .notes
            .iter()
            .any(|n| n.contains("descriptor") || n.contains("type"));
    assert!(
        named,
        "C {c:#x} reads other data now: {changed}; the check's problems: {:?}; notes: {:?}",
        checked
            .report
            .problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        checked.report.notes
    );
}

/// Guard for the fix above: on a clean store whose only damaged blob is Y (root CRC
/// mismatch), `forget_damaged_blob(Y)` leaves the store clean and consistent, Y gone and
/// its clusters free, the other blobs' clusters kept.
#[test]
fn deleting_the_only_damaged_blob_offline_frees_its_clusters() {
    let rt = runtime();
    let (bdev, desc) = common::malloc(8 << 20);
    let (a, y, a_clusters, y_clusters, md_start) = run(&rt, move || async move {
        let store = init(desc).await;
        let a = common::create_thick(&store, 2).await;
        let y = common::create_thick(&store, 2).await;
        let map = |id: u64| {
            let store = store.clone();
            async move {
                let blob = store.open_blob(id).await.unwrap();
                let map: Vec<u64> = blob.cluster_map().into_iter().map(u64::from).collect();
                blob.close().await.unwrap();
                map
            }
        };
        let (am, ym) = (map(a).await, map(y).await);
        let md_start = store.geometry().md_start;
        store.unload().await.unwrap();
        (a, y, am, ym, md_start)
    });
    rt.stop();
    let mut image = bdev.snapshot();
    let at = ((y & 0xffff_ffff) + md_start) as usize * 4096;
    image[at + 20] ^= 0x40;
    let cell = std::cell::RefCell::new(image);
    spool_blob::check::forget::forget_damaged_blob(&cell, y).unwrap();
    let image = cell.into_inner();
    assert_eq!(u32_at(&image, 16), 1, "the store is clean");
    let problems = check_problems(&image);
    assert!(
        problems.is_empty(),
        "consistent after the delete: {problems:?}"
    );
    let rt = runtime();
    let (_copy, desc) = common::from_image(&image);
    let (ids, used) = run(&rt, move || async move {
        let (store, _) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let out = (store.blob_ids(), store.used_clusters());
        std::mem::forget(store);
        out
    });
    rt.stop();
    assert!(ids.contains(&a) && !ids.contains(&y), "ids {ids:x?}");
    assert!(
        a_clusters.iter().all(|c| used.contains(c)),
        "A's clusters kept"
    );
    assert!(
        !y_clusters.iter().any(|c| used.contains(c)),
        "Y's clusters freed"
    );
}

/// One run of the sequence below with O's xattr `xattr_len` bytes long; `None` when the
/// first snapshot did not fail the way wanted (O's thin root fitting its page, or the md
/// region not full), else what O reads after the kill and the load, with the story.
fn pinned_page_taken_by_a_second_snapshot(xattr_len: usize) -> Option<(bool, String)> {
    let rt = runtime();
    let bdev = Arc::new(MallocBdev::new("r13e", 4096, DEVICE / 4096).unwrap());
    let errors = Arc::new(ErrorBdev::new(
        "r13e-faulty",
        Arc::clone(&bdev) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&errors) as Arc<dyn Bdev>).unwrap();
    let out = run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(24),
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let channel = store.channel().unwrap();
        let o = store
            .create_blob(&BlobOptions {
                num_clusters: 2,
                thin: true,
                form: ExtentForm::Table,
                xattrs: vec![("fill".into(), vec![0x5a; xattr_len])],
                ..BlobOptions::default()
            })
            .await
            .ok()?;
        let blob = store.open_blob(o).await.unwrap();
        let (result, _) = channel
            .write(&blob.io(), 0, buf_of(&pattern(7, CLUSTER as usize)))
            .await;
        result.unwrap();
        blob.close().await.unwrap();
        if store.used_md_pages().len() != 2 {
            return None; // O's root and its extent page, nothing more
        }
        // Fill the md region, then free one page (for S1's root).
        let mut fillers = Vec::new();
        while let Ok(id) = store.create_blob(&BlobOptions::default()).await {
            fillers.push(id);
        }
        let s1 = fillers.pop().unwrap();
        store.delete_blob(s1).await.unwrap();
        channel.flush().await.unwrap();
        // S1's removal fails (its root's third write on).
        for n in 3..40 {
            errors.add_rule(
                ErrorRule::new(-libc::EIO)
                    .kinds(&[IoKind::Write, IoKind::WriteZeroes])
                    .range_bytes(root_range(&store, s1))
                    .nth(n),
            );
        }
        let first = store.create_snapshot(o, &[]).await;
        let no_pages = matches!(&first, Err(err) if err.errno() == -libc::ENOMEM);
        if !no_pages || !store.blob_ids().contains(&s1) {
            std::mem::forget(store);
            return None;
        }
        // Room for S2 and O's continuation page.
        for _ in 0..3 {
            let id = fillers.pop().unwrap();
            store.delete_blob(id).await.unwrap();
        }
        channel.flush().await.unwrap();
        let s2 = store.create_snapshot(o, &[]).await;
        let flushed = channel.flush().await;
        let story = format!(
            "O {o:#x} (xattr {xattr_len} bytes); first snapshot: {first:?} (S1 {s1:#x} held); second: {s2:?}; flush: {flushed:?}"
        );
        std::mem::forget(store); // kill -9
        Some((o, s2.is_ok(), story))
    });
    rt.stop();
    let (o, s2_made, story) = out?;
    if !s2_made {
        return None;
    }
    let image = bdev.snapshot();
    let problems = check_problems(&image);
    let rt = runtime();
    let (_copy, desc) = common::from_image(&image);
    let (repaired, back) = run(&rt, move || async move {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap();
        let back = match store.open_blob(o).await {
            Ok(blob) => read_cluster0(&store, &blob).await,
            Err(err) => Err(err.to_string()),
        };
        std::mem::forget(store);
        (report.repaired, back)
    });
    rt.stop();
    let ok = matches!(&back, Ok(data) if *data == pattern(7, CLUSTER as usize));
    let how = match &back {
        Ok(data) if data.iter().all(|&b| b == 0) => "zeros".to_string(),
        Ok(_) if ok => "its data".to_string(),
        Ok(_) => "other data".to_string(),
        Err(err) => format!("an error: {err}"),
    };
    Some((
        ok,
        format!("{story}; check before the load: {problems:?}; the load: {repaired:?}; O's cluster 0 reads {how}"),
    ))
}

/// Sequence: a thin table-form blob O (one extent page E, cluster 0 written and flushed)
/// whose root page is nearly full (one large xattr), in a store whose md region is full but
/// for one page. A snapshot S1 of O: S1 takes that page, its map (naming E) is written and
/// E is pinned for S1; then O's thin root, now carrying `SNAP`, needs a continuation page
/// and there is none (-ENOMEM): the persist fails before planning anything, so O's map is
/// restored with E not marked dirty (unlike a failed write, nothing calls
/// `touch_clusters`). S1's removal fails too (its root write: -EIO), so S1 stays held on
/// disk naming E. Room is made (three filler blobs deleted) and a second snapshot S2 of O
/// succeeds: O's next root names E again (not moved), S2 takes E, `pin_extent_pages(S2)`
/// replaces S1's pin of E, and S2's finish unpins E altogether. kill -9.
///
/// On disk: S1 (`SNAPTMP` = O) names E; S2 (O's parent) names E. The load removes S1 as
/// never taken with `delete_untaken_snapshot(S1, O's extent table)`: O's table no longer
/// holds E (S2 does), so E is taken for S1's own, zeroed and freed: S2 loses its map and O,
/// reading through S2, loses its acknowledged, flushed cluster 0.
///
/// Expected: after the load O reads back its cluster 0.
/// Failed before the fix in this branch (O's map came back with E not dirty; now a failed
/// thin root marks O's extent pages dirty, so its next persist moves them and E stays
/// pinned for S1 alone). At the fix's commit: `... O's cluster 0 reads an error: blob
/// 0x100000000: corrupt metadata: SNAP names parent 0x100000014, which cannot be opened:
/// blob 0x100000014: corrupt metadata: extent page 0: CRC mismatch`.
#[test]
fn a_pinned_page_a_second_snapshot_takes_is_lost_when_the_load_removes_the_first() {
    let mut reached = Vec::new();
    for xattr_len in (3900..4040).rev() {
        if let Some((ok, story)) = pinned_page_taken_by_a_second_snapshot(xattr_len) {
            reached.push((ok, story));
            break;
        }
    }
    assert!(!reached.is_empty(), "no xattr length gave the sequence");
    let (ok, story) = &reached[0];
    eprintln!("{story}");
    assert!(ok, "{story}");
}

/// Found by `corruption_sweep_on_spdk_fixtures` (p1-blobcli-basic, md page 1 byte 4 xor
/// 0x01): SPDK's fixture p1, the extent page of blob 0x100000000 (md page 1) with its id
/// field changed to 0 and the page resealed. Spool's load takes a page with id 0 for a
/// zeroed one (`md_scan`: usable = CRC ok and id != 0), so the blob does not open
/// ("extent page 0 (md page 1) is unreadable or has a bad CRC"); `spool check` reported the
/// store consistent (it never looked at an extent page's id).
///
/// Expected: the check names the extent page (the blob it lists as damaged, as the load
/// lists it unreadable). Failed before the fix in this branch.
#[test]
fn check_names_an_extent_page_whose_id_is_zero() {
    let mut image = support::fixtures::load_image("p1-blobcli-basic");
    let md_start = u32_at(&image, 48) as usize;
    let at = (md_start + 1) * 4096;
    assert_eq!(
        u64::from_le_bytes(image[at..at + 8].try_into().unwrap()),
        0x1_0000_0000,
        "md page 1 is blob 0x100000000's extent page"
    );
    image[at + 4] = 0;
    spool_blob::format::seal_page(&mut image[at..at + 4096]);
    let problems = check_problems(&image);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("extent_page") && p.contains("0x100000000")),
        "{problems:?}"
    );
    let rt = runtime();
    let found = contents(&rt, &image).unwrap();
    rt.stop();
    assert!(
        matches!(
            found.iter().find(|(id, _)| *id == 0x1_0000_0000),
            Some((_, Err(_)))
        ),
        "the load does not open it either (what the check now says)"
    );
}
