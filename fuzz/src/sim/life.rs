//! One life of the simulated engine: from an init or a load (checked against the model) to
//! a clean unload or a power cut. Everything runs in a fresh [`Sim`] (two reactors; the
//! first is the metadata reactor) over a crash-recording device wrapped in an
//! error-injecting one; the driver is one task on the metadata reactor, issuing the plan's
//! operations (writes from either reactor) and keeping the model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, CrashBdev, DmaBuf, ErrorBdev, ErrorRule, IoKind, Survivor};
use spool_blob::{Blob, BlobOptions, Blobstore, InitOptions, LoadOptions};
use spool_reactor::{ReactorId, Sim, SimOptions};

use super::data::{decode, encode};
use super::model::{Model, ModelBlob, ANY, UNIT};
use super::plan::{FaultErrno, FaultIo, Op, WriteSpec};

/// Cluster size of simulated stores.
pub const CLUSTER: u64 = 64 << 10;
/// Simulated device size: 40 clusters, about 30 for data (workloads fill it).
pub const DEVICE: u64 = 40 * CLUSTER;
/// Metadata pages of simulated stores: two root-superset chunks of 64 pages
/// (`format::root_superset::MIN_SHIFT`), so a dirty load after a cut reads only the chunks
/// the record covers (bounded and selective), and a create past page 63 must grow the
/// record first.
pub const MD_PAGES: u32 = 128;
/// Reactors simulated.
pub const REACTORS: usize = 2;
/// Simulation steps one life may take before it counts as hung.
pub const LIFE_STEPS_MAX: u64 = 20_000_000;
/// io_units per cluster.
pub const UPC: u64 = CLUSTER / UNIT;

/// Bugs a self-test plants (the simulation must catch each), and optional stricter checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// Planted: the device acknowledges flushes without making anything durable.
    pub flush_lies: bool,
    /// Planted: the blob layer skips its metadata ordering flushes.
    pub skip_ordering_flushes: bool,
    /// Planted: the NBD front end acknowledges FLUSH and FUA writes without a device flush.
    pub nbd_skips_flushes: bool,
    /// Planted: the blob layer never grows the root-superset record ahead of a create (a
    /// dirty load then misses blobs rooted in a chunk the record does not cover).
    pub skip_root_superset_growth: bool,
    /// Stricter check: a thick blob's new clusters must read zeros (the blob layer does not
    /// promise it; see the seed-2 regression test).
    pub strict_thick_zeros: bool,
}

impl Bugs {
    /// What a thick blob's new units may read.
    fn fresh_thick(&self) -> u64 {
        if self.strict_thick_zeros {
            0
        } else {
            super::model::ANY
        }
    }
}

/// How a life ends.
#[derive(Debug, Clone)]
pub enum End {
    /// Clean unload (falling back to a cut losing every pending write if the unload fails
    /// on an injected fault).
    Reload,
    /// Power cut.
    Cut {
        /// Writes in flight at the cut.
        inflight: Vec<WriteSpec>,
        /// Driver yields before the cut.
        yields: u32,
        /// Seed of the pending writes' fates.
        fate: u64,
    },
    /// The last life: load, check, unload.
    Verify,
}

/// What a life hands to the next.
pub struct LifeOut {
    /// The model after it.
    pub model: Model,
    /// One line per operation and its outcome.
    pub log: Vec<String>,
    /// The device image the next life starts from.
    pub image: Vec<u8>,
    /// Requests failed by injection.
    pub injected: u64,
    /// Hash of the simulation's trace (equal for equal seeds).
    pub trace_hash: u64,
}

/// What a life's operations share: the device's layers, the reactors, the planted bugs.
pub(super) struct Ctx {
    crash: Arc<CrashBdev>,
    errors: Arc<ErrorBdev>,
    /// The simulated reactors (the first is the metadata reactor, the driver's).
    pub(super) reactors: Vec<ReactorId>,
    /// Planted bugs.
    pub(super) bugs: Bugs,
}

impl Ctx {
    /// An error is part of the plan when the device is full (-ENOSPC: no free cluster;
    /// -ENOMEM: every metadata page in use, SPDK's errno for it), or a fault was injected in
    /// this life (its effects may surface in a later operation).
    pub(super) fn expected(&self, errno: i32) -> bool {
        errno == -libc::ENOSPC || errno == -libc::ENOMEM || self.errors.injected_count() > 0
    }
}

struct DriverOut {
    model: Model,
    log: Vec<String>,
    result: Result<Option<Vec<u8>>, String>,
}

/// Runs one life; `image` is `None` for the first (which inits the store).
pub fn run_life(
    seed: u64,
    image: Option<Vec<u8>>,
    ops: Vec<Op>,
    end: End,
    model: Model,
    bugs: Bugs,
) -> Result<LifeOut, (Vec<String>, String)> {
    let mut sim = Sim::new(SimOptions {
        seed,
        reactors: REACTORS,
    });
    let reactors = sim.reactors();
    let crash = Arc::new(
        match &image {
            Some(image) => CrashBdev::from_image("sim", UNIT as u32, image),
            None => CrashBdev::new("sim", UNIT as u32, DEVICE / UNIT),
        }
        .map_err(|err| (Vec::new(), format!("device: {err}")))?,
    );
    crash.testing_flush_lies(bugs.flush_lies);
    let errors = Arc::new(ErrorBdev::new(
        "sim-faults",
        Arc::clone(&crash) as Arc<dyn Bdev>,
    ));
    let desc = BdevDesc::open(Arc::clone(&errors) as Arc<dyn Bdev>)
        .map_err(|err| (Vec::new(), format!("open: {err}")))?;
    let ctx = Ctx {
        crash: Arc::clone(&crash),
        errors: Arc::clone(&errors),
        reactors: reactors.clone(),
        bugs,
    };
    let first = image.is_none();
    let handle = sim
        .spawn_on(reactors[0], move || {
            driver(ctx, desc, first, ops, end, model)
        })
        .map_err(|err| (Vec::new(), format!("spawn: {err}")))?;
    let mut steps = 0u64;
    let out = loop {
        if let Some(out) = handle.try_take() {
            break out;
        }
        if steps >= LIFE_STEPS_MAX {
            return Err((
                Vec::new(),
                format!("hang: the life did not finish in {LIFE_STEPS_MAX} steps"),
            ));
        }
        if !sim.step() {
            match handle.try_take() {
                Some(out) => break out,
                None => {
                    return Err((
                        Vec::new(),
                        format!("hang: nothing left to run after {steps} steps (a lost wakeup or completion)"),
                    ))
                }
            }
        }
        steps += 1;
    };
    let out = out.map_err(|err| (Vec::new(), format!("the driver task failed: {err}")))?;
    let trace_hash = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sim.trace().hash(&mut hasher);
        hasher.finish()
    };
    let injected = errors.injected_count();
    sim.stop();
    match out.result {
        Ok(cut_image) => Ok(LifeOut {
            model: out.model,
            log: out.log,
            image: cut_image.unwrap_or_else(|| crash.live_image()),
            injected,
            trace_hash,
        }),
        Err(what) => Err((out.log, what)),
    }
}

async fn driver(
    ctx: Ctx,
    desc: BdevDesc,
    first: bool,
    ops: Vec<Op>,
    end: End,
    mut model: Model,
) -> DriverOut {
    let mut log = Vec::new();
    let result = drive(&ctx, desc, first, ops, end, &mut model, &mut log).await;
    DriverOut { model, log, result }
}

async fn drive(
    ctx: &Ctx,
    desc: BdevDesc,
    first: bool,
    ops: Vec<Op>,
    end: End,
    model: &mut Model,
    log: &mut Vec<String>,
) -> Result<Option<Vec<u8>>, String> {
    let store = if first {
        Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                md_pages: Some(MD_PAGES),
                ..InitOptions::default()
            },
        )
        .await
        .map_err(|err| format!("init: {err}"))?
    } else {
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .map_err(|err| format!("the store does not load: {err}"))?;
        log.push(format!(
            "load: {} blobs, recovered {}, repaired {:?}, unreadable {:?}",
            report.blobs, report.recovered, report.repaired, report.unreadable
        ));
        verify(&store, model, log).await?;
        store
    };
    store.testing_skip_ordering_flushes(ctx.bugs.skip_ordering_flushes);
    store.testing_skip_root_superset_growth(ctx.bugs.skip_root_superset_growth);
    for (index, op) in ops.into_iter().enumerate() {
        let line = format!("{op:?}");
        let outcome = run_op(ctx, &store, model, op)
            .await
            .map_err(|what| format!("op {index} {line}: {what}"))?;
        log.push(format!("{line} -> {outcome}"));
    }
    match end {
        End::Verify => {
            store
                .unload()
                .await
                .map_err(|err| format!("final unload: {err}"))?;
            Ok(None)
        }
        End::Reload => match store.unload().await {
            Ok(()) => {
                // Unload flushes: everything acknowledged is durable.
                model.flush();
                log.push("reload: unloaded".into());
                Ok(None)
            }
            Err(err) if ctx.expected(err.errno()) => {
                log.push(format!("reload: unload failed ({err}), cut instead"));
                Ok(Some(ctx.crash.cut_power_keep_none()))
            }
            Err(err) => Err(format!("unload: {err}")),
        },
        End::Cut {
            inflight,
            yields,
            fate,
        } => {
            let mut opened = BTreeMap::new();
            let mut handles = Vec::new();
            for spec in &inflight {
                if let Some((id, write)) = prepare_write(model, spec) {
                    let Ok(Some(blob)) = open(ctx, &store, &mut opened, id).await else {
                        continue;
                    };
                    let reactor = ctx.reactors[spec.reactor as usize % ctx.reactors.len()];
                    handles.push(spawn_write(reactor, blob, write));
                    model.writes(id, &[(write.0, write.1, write.2, false)]);
                }
            }
            for _ in 0..yields {
                spool_reactor::yield_now().await;
            }
            let pending = ctx.crash.pending_writes();
            let survivors = fates(&pending, fate);
            log.push(format!(
                "cut: {} writes in flight, {} pending, {} reach the media",
                inflight.len(),
                pending.len(),
                survivors.len()
            ));
            let image = ctx.crash.cut_power_with(&survivors);
            // The crashed process: nothing of it runs again (its tasks end with the sim).
            // Its objects are leaked, not dropped: free the device's images they hold (about
            // 4 MiB a cut, else gigabytes over a few hundred seeds in one process).
            ctx.crash.discard_media();
            for (_, blob) in opened {
                std::mem::forget(blob);
            }
            std::mem::forget(handles);
            std::mem::forget(store);
            Ok(Some(image))
        }
    }
}

/// The fates of the pending writes at a cut, from `fate`: each lost, whole or torn (a
/// random subset of its blocks), the survivors in completion order or shuffled.
fn fates(pending: &[spool_bdev::PendingWrite], fate: u64) -> Vec<Survivor> {
    let mut rng = fastrand::Rng::with_seed(fate);
    let mut survivors = Vec::new();
    for write in pending {
        match rng.u32(0..10) {
            0..=3 => {}
            4..=7 => survivors.push(Survivor {
                index: write.index,
                blocks: None,
            }),
            _ => {
                let blocks = write.len_bytes / UNIT;
                survivors.push(Survivor {
                    index: write.index,
                    blocks: Some((0..blocks).filter(|_| rng.bool()).collect()),
                });
            }
        }
    }
    if rng.bool() {
        rng.shuffle(&mut survivors);
    }
    survivors
}

/// Xattrs of 3,000 bytes every created blob carries: one md page each.
const XATTRS: u8 = 12;

/// The xattrs every created blob carries ([`XATTRS`] of 3,000 bytes: a chain of that many
/// md pages), so plans reach the store's second root-superset chunk (md page 64 on) and the bounded
/// dirty load after a cut has chunks to skip and a record to grow.
fn create_xattrs() -> Vec<(String, Vec<u8>)> {
    (0..XATTRS)
        .map(|i| (format!("sim{i}"), vec![i; 3000]))
        .collect()
}

/// Opens blob `id` once per operation: `None` when the open failed as a fault allows.
async fn open<'a>(
    ctx: &Ctx,
    store: &Blobstore,
    opened: &'a mut BTreeMap<u64, Blob>,
    id: u64,
) -> Result<Option<&'a Blob>, String> {
    if let std::collections::btree_map::Entry::Vacant(slot) = opened.entry(id) {
        match store.open_blob(id).await {
            Ok(blob) => {
                slot.insert(blob);
            }
            Err(err) if ctx.expected(err.errno()) => return Ok(None),
            Err(err) => return Err(format!("open {id:#x}: {err}")),
        }
    }
    Ok(opened.get(&id))
}

/// Opens blob `id` for one operation: `None` when the open failed as a fault allows.
pub(super) async fn open_one(
    ctx: &Ctx,
    store: &Blobstore,
    id: u64,
) -> Result<Option<Blob>, String> {
    match store.open_blob(id).await {
        Ok(blob) => Ok(Some(blob)),
        Err(err) if ctx.expected(err.errno()) => Ok(None),
        Err(err) => Err(format!("open {id:#x}: {err}")),
    }
}

/// (first unit, units, value) of a write spec against the model, and its blob.
fn prepare_write(model: &mut Model, spec: &WriteSpec) -> Option<(u64, (u64, u64, u64))> {
    let id = model.pick(spec.pick, |blob| !blob.snapshot)?;
    let size = model.blobs[&id].clusters * UPC;
    if size == 0 {
        return None;
    }
    let unit = u64::from(spec.unit) % size;
    let units = u64::from(spec.units).clamp(1, size - unit);
    Some((id, (unit, units, model.value())))
}

fn spawn_write(
    reactor: ReactorId,
    blob: &Blob,
    (unit, units, value): (u64, u64, u64),
) -> spool_reactor::RemoteHandle<Result<(), i32>> {
    let io = blob.io();
    let data = encode(value, unit, units);
    let spawned = spool_reactor::spawn_on(reactor, move || async move {
        let channel = io.channel().map_err(|err| err.errno())?;
        let mut buf = DmaBuf::alloc(data.len()).map_err(|_| -libc::ENOMEM)?;
        buf.copy_from_slice(&data);
        channel
            .write(&io, unit, buf)
            .await
            .0
            .map_err(|err| err.errno())
    });
    match spawned {
        Ok(handle) => handle,
        Err(_) => {
            // Reactors never stop during a life; report as a failed spawn through a
            // completed handle.
            spool_reactor::spawn_on(reactor, || async { Err(-libc::ESHUTDOWN) })
                .expect("a simulated reactor accepts work")
        }
    }
}

/// Runs one operation; its outcome for the log, or what went wrong.
async fn run_op(ctx: &Ctx, store: &Blobstore, model: &mut Model, op: Op) -> Result<String, String> {
    match op {
        Op::Create { thin, clusters } => {
            let result = store
                .create_blob(&BlobOptions {
                    num_clusters: u64::from(clusters),
                    thin,
                    xattrs: create_xattrs(),
                    ..BlobOptions::default()
                })
                .await;
            match result {
                Ok(id) => {
                    let fresh = if thin { 0 } else { ctx.bugs.fresh_thick() };
                    model
                        .blobs
                        .insert(id, ModelBlob::new(thin, u64::from(clusters), UPC, fresh));
                    Ok(format!("{id:#x}"))
                }
                Err(err) => md_error(ctx, model, Failed::Create, err.errno(), "create"),
            }
        }
        Op::Write(spec) => writes(ctx, store, model, &[spec]).await,
        Op::Batch(specs) => writes(ctx, store, model, &specs).await,
        Op::Read { pick } => {
            let Some(id) = model.pick(pick, |blob| !blob.tainted) else {
                return Ok("no blob".into());
            };
            let Some(blob) = open_one(ctx, store, id).await? else {
                return Ok("open failed".into());
            };
            let result = read_blob(store, &blob).await;
            close(ctx, blob).await?;
            match result {
                Ok(data) => {
                    let mblob = &model.blobs[&id];
                    for (unit, bytes) in data.chunks(UNIT as usize).enumerate() {
                        let allowed = &mblob.units[unit].live;
                        if allowed.contains(&ANY) {
                            continue;
                        }
                        let value = decode(bytes, unit as u64)
                            .map_err(|what| format!("blob {id:#x}: {what}"))?;
                        if !allowed.contains(&value) {
                            return Err(format!(
                                "blob {id:#x} unit {unit} reads value {value}, the model allows {allowed:?}"
                            ));
                        }
                    }
                    Ok(format!("{id:#x} ok"))
                }
                Err(errno) if ctx.expected(errno) => Ok(format!("{id:#x} errno {errno}")),
                Err(errno) => Err(format!("read {id:#x}: errno {errno}")),
            }
        }
        Op::Flush { reactor } => {
            let reactor = ctx.reactors[reactor as usize % ctx.reactors.len()];
            let result = match model.pick(0, |_| true) {
                Some(id) => {
                    let Some(blob) = open_one(ctx, store, id).await? else {
                        return Ok("open failed".into());
                    };
                    let io = blob.io();
                    let handle = spool_reactor::spawn_on(reactor, move || async move {
                        let channel = io.channel().map_err(|err| err.errno())?;
                        channel.flush().await.map_err(|err| err.errno())
                    })
                    .map_err(|err| format!("spawn: {err}"))?;
                    let result = handle.await.map_err(|err| format!("flush task: {err}"))?;
                    close(ctx, blob).await?;
                    result
                }
                None => {
                    let channel = store.channel().map_err(|err| format!("channel: {err}"))?;
                    channel.flush().await.map_err(|err| err.errno())
                }
            };
            match result {
                Ok(()) => {
                    model.flush();
                    Ok("ok".into())
                }
                Err(errno) if ctx.expected(errno) => Ok(format!("errno {errno}")),
                Err(errno) => Err(format!("flush: errno {errno}")),
            }
        }
        Op::Resize { pick, clusters } => {
            let Some(id) = model.pick(pick, |blob| !blob.snapshot) else {
                return Ok("no blob".into());
            };
            let Some(blob) = open_one(ctx, store, id).await? else {
                return Ok("open failed".into());
            };
            let fresh = if blob.is_thin() {
                0
            } else {
                ctx.bugs.fresh_thick()
            };
            let parent = blob.parent_id();
            let old = model.blobs[&id].clusters;
            let result = blob.resize(u64::from(clusters)).await;
            // The size in memory now (a failure may come after the map changed).
            let now = blob.num_clusters();
            let closed = close(ctx, blob).await?;
            match result {
                Ok(()) => {
                    model.resize(id, u64::from(clusters), parent, fresh);
                    if !closed {
                        // Close persists the resize: a failure leaves the size on disk old
                        // or new (the blob stays dirty in memory, at the new size).
                        model.unsettle(id);
                        return Ok(format!("{id:#x} resized, close failed"));
                    }
                    Ok(format!("{id:#x} ok"))
                }
                Err(err) => {
                    let outcome = md_error(ctx, model, Failed::Resize(id), err.errno(), "resize")?;
                    if now != old {
                        model.resize(id, now, parent, fresh);
                    }
                    if !closed {
                        model.unsettle(id);
                    }
                    Ok(format!("{outcome}, {now} clusters in memory"))
                }
            }
        }
        Op::Sync { pick } => {
            let Some(id) = model.pick(pick, |blob| !blob.snapshot) else {
                return Ok("no blob".into());
            };
            let Some(blob) = open_one(ctx, store, id).await? else {
                return Ok("open failed".into());
            };
            let result = blob.sync_md().await;
            if !close(ctx, blob).await? {
                model.unsettle(id);
            }
            match result {
                Ok(()) => Ok(format!("{id:#x} ok")),
                Err(err) => md_error(ctx, model, Failed::Resize(id), err.errno(), "sync"),
            }
        }
        Op::Snapshot { pick, racing } => {
            let Some(id) = model.pick(pick, |blob| !blob.snapshot) else {
                return Ok("no blob".into());
            };
            let before = model.blobs[&id].clone();
            // The racing writes go to the same blob, issued just before the snapshot.
            let mut opened = BTreeMap::new();
            let mut issued = Vec::new();
            for spec in &racing {
                let spec = WriteSpec { pick: 0, ..*spec };
                let size = before.clusters * UPC;
                if size == 0 {
                    break;
                }
                let unit = u64::from(spec.unit) % size;
                let units = u64::from(spec.units).clamp(1, size - unit);
                let write = (unit, units, model.value());
                let Some(blob) = open(ctx, store, &mut opened, id).await? else {
                    break;
                };
                let reactor = ctx.reactors[spec.reactor as usize % ctx.reactors.len()];
                issued.push((write, spawn_write(reactor, blob, write)));
            }
            let result = store.create_snapshot(id, &[]).await;
            let mut writes = Vec::new();
            let mut outcome = Vec::new();
            for ((unit, units, value), handle) in issued {
                let completed = match handle.await.map_err(|err| format!("write task: {err}"))? {
                    Ok(()) => true,
                    Err(errno) if ctx.expected(errno) => false,
                    Err(errno) => {
                        return Err(format!(
                            "write {id:#x} {unit}+{units} racing a snapshot: errno {errno}"
                        ))
                    }
                };
                outcome.push(format!(
                    "{unit}+{units}=v{value}{}",
                    if completed { "" } else { " failed" }
                ));
                writes.push((unit, units, value, completed));
            }
            model.writes(id, &writes);
            for (_, blob) in opened {
                close(ctx, blob).await?;
            }
            let racing: Vec<(u64, u64, u64)> =
                writes.iter().map(|&(u, n, v, _)| (u, n, v)).collect();
            match result {
                Ok(snap) => {
                    model.snapshot_racing(&before, snap, &racing);
                    Ok(format!(
                        "{id:#x} -> {snap:#x} racing [{}]",
                        outcome.join(" ")
                    ))
                }
                Err(err) => md_error(ctx, model, Failed::Snapshot(id), err.errno(), "snapshot"),
            }
        }
        Op::Clone { pick } => {
            let Some(snap) = model.pick(pick, |blob| blob.snapshot) else {
                return Ok("no snapshot".into());
            };
            match store.create_clone(snap, &[]).await {
                Ok(clone) => {
                    model.clone_of(snap, clone);
                    Ok(format!("{snap:#x} -> {clone:#x}"))
                }
                Err(err) => md_error(ctx, model, Failed::Snapshot(snap), err.errno(), "clone"),
            }
        }
        Op::Inflate { pick } => {
            let Some(id) = model.pick(pick, |blob| !blob.snapshot) else {
                return Ok("no blob".into());
            };
            match store.inflate_blob(id).await {
                Ok(()) => Ok(format!("{id:#x} ok")),
                Err(err) => md_error(ctx, model, Failed::Content(id), err.errno(), "inflate"),
            }
        }
        Op::Delete { pick } => {
            let Some(id) = model.pick(pick, |_| true) else {
                return Ok("no blob".into());
            };
            match store.delete_blob(id).await {
                Ok(()) => {
                    model.delete(id);
                    Ok(format!("{id:#x} ok"))
                }
                Err(err) if err.errno() == -libc::EBUSY => Ok(format!("{id:#x} busy")),
                Err(err) => md_error(ctx, model, Failed::Delete(id), err.errno(), "delete"),
            }
        }
        Op::Fault { io, errno, nth } => {
            let kind = match io {
                FaultIo::Write => IoKind::Write,
                FaultIo::Flush => IoKind::Flush,
                FaultIo::Read => IoKind::Read,
            };
            let errno = match errno {
                FaultErrno::Eio => -libc::EIO,
                FaultErrno::Enospc => -libc::ENOSPC,
            };
            ctx.errors
                .add_rule(ErrorRule::new(errno).kinds(&[kind]).nth(u64::from(nth)));
            Ok("armed".into())
        }
        Op::Spikes { one_in, ms } => {
            ctx.crash
                .set_latency_spikes(u64::from(one_in), u64::from(ms) * 1_000_000);
            Ok("set".into())
        }
        Op::Nbd {
            pick,
            reactor,
            structured,
            requests,
            split,
        } => {
            super::nbd::run(
                ctx, store, model, pick, reactor, structured, &requests, split,
            )
            .await
        }
        Op::Reload | Op::Cut { .. } => Ok("(ends a life)".into()),
    }
}

/// What a failed metadata operation may have done (model.rs has the rules).
#[derive(Debug, Clone, Copy)]
enum Failed {
    /// A create: its new id may appear.
    Create,
    /// A resize or sync of the blob: its size on disk old or new (the caller models the
    /// size in memory).
    Resize(u64),
    /// A snapshot of the blob, or a clone of the snapshot: a new id may appear; the blob
    /// reads as before.
    Snapshot(u64),
    /// An inflate or decouple of the blob: it reads as before.
    Content(u64),
    /// A delete (or merge-delete) of the blob: it may vanish; if not, it reads as before.
    Delete(u64),
}

/// A metadata operation failed: expected (the device is full, or a fault was injected)
/// or a failure. An expected error with a fault injected is modelled by what the
/// operation can do ([`Failed`]).
fn md_error(
    ctx: &Ctx,
    model: &mut Model,
    failed: Failed,
    errno: i32,
    what: &str,
) -> Result<String, String> {
    if !ctx.expected(errno) {
        return Err(format!("{what}: unexpected errno {errno}"));
    }
    if ctx.errors.injected_count() > 0 {
        match failed {
            Failed::Create => model.failed_create(),
            Failed::Resize(id) => model.unsettle(id),
            Failed::Snapshot(id) => {
                model.failed_create();
                model.taint(id);
            }
            Failed::Content(id) => model.taint(id),
            Failed::Delete(id) => model.failed_delete(id),
        }
    }
    Ok(format!("errno {errno}"))
}

/// Closes `blob`: `Ok(false)` when the close failed as a fault allows (its metadata may
/// not be written).
pub(super) async fn close(ctx: &Ctx, blob: Blob) -> Result<bool, String> {
    match blob.close().await {
        Ok(()) => Ok(true),
        Err(err) if ctx.expected(err.errno()) => Ok(false),
        Err(err) => Err(format!("close: {err}")),
    }
}

async fn writes(
    ctx: &Ctx,
    store: &Blobstore,
    model: &mut Model,
    specs: &[WriteSpec],
) -> Result<String, String> {
    let mut opened = BTreeMap::new();
    let mut issued = Vec::new();
    for spec in specs {
        let Some((id, write)) = prepare_write(model, spec) else {
            continue;
        };
        let Some(blob) = open(ctx, store, &mut opened, id).await? else {
            continue;
        };
        let reactor = ctx.reactors[spec.reactor as usize % ctx.reactors.len()];
        issued.push((id, write, spawn_write(reactor, blob, write)));
    }
    let mut by_blob: BTreeMap<u64, Vec<(u64, u64, u64, bool)>> = BTreeMap::new();
    let mut outcome = Vec::new();
    for (id, (unit, units, value), handle) in issued {
        let result = handle.await.map_err(|err| format!("write task: {err}"))?;
        let completed = match result {
            Ok(()) => true,
            Err(errno) if ctx.expected(errno) => false,
            Err(errno) => return Err(format!("write {id:#x} {unit}+{units}: errno {errno}")),
        };
        outcome.push(format!(
            "{id:#x}@{unit}+{units}=v{value}{}",
            if completed { "" } else { " failed" }
        ));
        by_blob
            .entry(id)
            .or_default()
            .push((unit, units, value, completed));
    }
    for (id, writes) in by_blob {
        model.writes(id, &writes);
    }
    for (_, blob) in opened {
        close(ctx, blob).await?;
    }
    Ok(outcome.join(" "))
}

async fn read_blob(store: &Blobstore, blob: &Blob) -> Result<Vec<u8>, i32> {
    let len = blob.num_clusters() * CLUSTER;
    if len == 0 {
        return Ok(Vec::new());
    }
    let channel = store.channel().map_err(|err| err.errno())?;
    let buf = DmaBuf::alloc(len as usize).map_err(|_| -libc::ENOMEM)?;
    let (result, buf) = channel.read(&blob.io(), 0, buf).await;
    result.map_err(|err| err.errno())?;
    Ok(buf.to_vec())
}

/// After a load: the blobs the model requires exist, none it forbids does, every blob
/// reads back values its crash sets allow, no cluster is owned twice and none leaked.
/// Re-bases the model on what is on disk.
async fn verify(store: &Blobstore, model: &mut Model, log: &mut Vec<String>) -> Result<(), String> {
    let ids = store.blob_ids();
    let known = model.ids();
    for id in known {
        if !ids.contains(&id) {
            let blob = &model.blobs[&id];
            if blob.durable && !blob.may_vanish {
                return Err(format!(
                    "blob {id:#x} lost: its create was covered by a flush and no delete was{}",
                    if blob.tainted {
                        " (a metadata operation on it failed, not a delete)"
                    } else {
                        ""
                    }
                ));
            }
            model.blobs.remove(&id);
        }
    }
    for &id in &ids {
        if model.blobs.contains_key(&id) {
            continue;
        }
        if let Some(blob) = model.deleted.remove(&id) {
            model.blobs.insert(id, blob);
        } else if model.strays_allowed && !model.completed_deletes.contains(&id) {
            // What a failed create, snapshot or clone left: its content is not predicted.
            model.blobs.insert(id, ModelBlob::new(true, 0, UPC, ANY));
            model
                .blobs
                .get_mut(&id)
                .expect("just inserted")
                .crash_sizes
                .clear();
        } else if model.completed_deletes.contains(&id) {
            return Err(format!(
                "blob {id:#x} exists after the restart: its delete completed"
            ));
        } else {
            return Err(format!(
                "blob {id:#x} exists after the restart: never created, or its delete was flushed"
            ));
        }
    }
    model.deleted.clear();
    model.strays_allowed = false;
    model.completed_deletes.clear();
    let mut owned = BTreeSet::new();
    for id in ids {
        let blob = store
            .open_blob(id)
            .await
            .map_err(|err| format!("blob {id:#x} does not open after the restart: {err}"))?;
        for cluster in blob.cluster_map().into_iter().filter(|&c| c != 0) {
            if !owned.insert(u64::from(cluster)) {
                return Err(format!("cluster {cluster} owned twice (blob {id:#x})"));
            }
        }
        let clusters = blob.num_clusters();
        log.push(format!(
            "  blob {id:#x}: {clusters} clusters, map {:?}, parent {:?}, read-only {}",
            blob.cluster_map(),
            blob.parent_id(),
            blob.is_read_only()
        ));
        let data = read_blob(store, &blob)
            .await
            .map_err(|errno| format!("blob {id:#x} does not read: errno {errno}"))?;
        let read_only = blob.is_read_only();
        let thin = blob.is_thin();
        blob.close()
            .await
            .map_err(|err| format!("close {id:#x}: {err}"))?;
        let Some(mblob) = model.blobs.get_mut(&id) else {
            continue;
        };
        // A stray (no crash size yet) takes the size it has.
        let stray = mblob.crash_sizes.is_empty();
        if !stray && !mblob.crash_sizes.contains(&clusters) {
            return Err(format!(
                "blob {id:#x} has {clusters} clusters after the restart, the model allows {:?}",
                mblob.crash_sizes
            ));
        }
        let units = (clusters * UPC) as usize;
        if mblob.units.len() < units {
            let fill = if stray {
                super::model::UnitState {
                    live: BTreeSet::from([ANY]),
                    crash: BTreeSet::from([ANY]),
                }
            } else {
                Default::default()
            };
            mblob.units.resize(units, fill);
        }
        for (unit, bytes) in data.chunks(UNIT as usize).enumerate() {
            let state = &mut mblob.units[unit];
            if state.crash.contains(&ANY) {
                // Unspecified content (a thick blob's new cluster, or a stray a failed
                // create, snapshot or clone left): a decodable value is tracked from now
                // on, anything else stays unspecified until written.
                let value = decode(bytes, unit as u64).unwrap_or(ANY);
                state.live = BTreeSet::from([value]);
                state.crash = BTreeSet::from([value]);
                continue;
            }
            let value = decode(bytes, unit as u64)
                .map_err(|what| format!("blob {id:#x} after the restart: {what}"))?;
            if !state.crash.contains(&value) {
                return Err(format!(
                    "blob {id:#x} unit {unit} reads value {value} after the restart, the model allows {:?} (live was {:?})",
                    state.crash, state.live
                ));
            }
            state.live = BTreeSet::from([value]);
            state.crash = BTreeSet::from([value]);
        }
        for state in mblob.units.iter_mut().skip(units) {
            *state = Default::default();
        }
        mblob.clusters = clusters;
        mblob.crash_sizes = BTreeSet::from([clusters]);
        mblob.durable = true;
        mblob.tainted = false;
        mblob.md_unsettled = false;
        mblob.may_vanish = false;
        mblob.snapshot = read_only;
        mblob.thin = thin;
    }
    let md = store.geometry().md_clusters;
    let used: BTreeSet<u64> = store
        .used_clusters()
        .into_iter()
        .filter(|&c| c >= md)
        .collect();
    if used != owned {
        let leaked: Vec<u64> = used.difference(&owned).copied().collect();
        let unmarked: Vec<u64> = owned.difference(&used).copied().collect();
        return Err(format!(
            "cluster accounting after the restart: leaked {leaked:?}, owned but free {unmarked:?}"
        ));
    }
    Ok(())
}
