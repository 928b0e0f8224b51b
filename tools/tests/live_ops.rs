//! Goal: issue 14's live operations. Snapshot, clone, resize, inflate, decouple and delete of
//! lvols run through `spool serve`'s JSON-RPC while NBD clients write the volume: a snapshot
//! is a point-in-time image (every block holds a version that was written, at least the last
//! one acknowledged before the call began, none issued after it returned), its clone is
//! exported and written on its own, fio's crc32c verify sees nothing wrong, deleting an
//! exported lvol or a snapshot with two clones answers -EBUSY; and a kill -9 anywhere in that
//! loop leaves a store that loads with every lvol's name and uuid, every cluster owned once,
//! none leaked, and the data the clients were promised.
//!
//! Method: an lvol store (`spool init --lvs`) with one thin lvol `origin`, served by the built
//! daemon (only `origin` exported at start). A writer of our own (the engine's NBD codec, at
//! queue depth 8) writes 4 KiB blocks stamped with (block, generation) into one region of the
//! origin and records, per block, when each write was sent and when it was acknowledged
//! (writes to one block never overlap). fio's nbd engine writes and verifies another region.
//! Each JSON-RPC call is timed around the call itself; a view (a snapshot, or the origin read
//! while written) taken between `begin` and `end` must hold, in every block, a write from the
//! last one acknowledged before `begin` onwards that was sent before `end`. Snapshots and
//! clones are exported with `nbd_start_export` and read with the same client. The kill test
//! SIGKILLs the daemon at seeded points (the seed is printed; `SPOOL_TEST_SEED` replays it),
//! in the middle of a call, then checks the store offline (`spool info`, which loads and
//! recovers it in memory, a command that writes the recovery back, `spool dump`'s cluster
//! ownership, `spool ls`'s names and uuids) and restarts
//! the daemon to read every volume back.

mod daemon;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::{check_clusters_owned_once, spawn_client, spool, spool_json, Daemon, NbdClient};
use serde_json::{json, Value};
use spool_engine::nbd::wire::transmission_flags;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const IMAGE: &str = "store.img";
/// The origin's size at the start; resizes keep it within `ORIGIN_MIB..=ORIGIN_MIB + 8`.
const ORIGIN_MIB: u64 = 64;
/// fio writes and verifies `[0, FIO_MIB)` of the origin.
const FIO_MIB: u64 = 8;
/// The stamped writer's region: `REGION_BLOCKS` blocks from `REGION_START`.
const REGION_START: u64 = 16 * MIB;
const REGION_BLOCKS: u64 = 2048;
/// The first 8 bytes of every block the origin's writer writes, and of a clone's own writes.
const ORIGIN_MAGIC: u64 = u64::from_be_bytes(*b"SPOOLPIT");
const CLONE_MAGIC: u64 = u64::from_be_bytes(*b"SPOOLCLN");
/// How long one JSON-RPC call may take.
const RPC_LIMIT: Duration = Duration::from_secs(60);
/// How long the writer may go without an acknowledgement (a loaded machine starves the
/// daemon's io_uring workers for seconds).
const ACK_LIMIT: Duration = Duration::from_secs(60);

/// The tests take turns: each runs a daemon with two reactors and several clients, and CI
/// machines have few cores. Open (issue 14): run at once on a loaded 2-core machine, about one
/// run in five had a daemon stop acknowledging the origin's writes for good (both reactors
/// idle, no I/O left in its io_uring rings), e.g. after a restart and a merge into the
/// origin; a merge then never finishes draining. Not seen with the tests taking turns.
/// Seen again (hang14) on the 16:46 code (5fa0a08), twice in 78 concurrent runs, both at
/// once: the writer's acknowledgements stopped at the resize of the origin that follows
/// stopping the clone's export; both daemons had their io_uring rings empty and reactor 1
/// asleep in `epoll_wait` with no timeout (no timer pending, so not a freeze's drain loop,
/// which polls on a 20 µs timer: something waited for a wake-up that never came). Not seen
/// in 46 concurrent runs at 6258fc5 (not enough to call it gone); the cause is not known,
/// so the turn stays. `blob/tests/live_ops_hang.rs` runs the same loop on the blob layer
/// under the simulation (power cuts and a merge into the origin after the load included)
/// and fails on a stall; no stall in 224 seeds on 5fa0a08 nor on 6258fc5 (300 seeds, then
/// 40 minutes of seeds from 0 with the clone step).
/// `SPOOL_NO_TURN=1` runs them at once (to hunt it; with `SPOOL_HANG_HOLD=SECS` and
/// `--nocapture` a failing test keeps its daemon alive that long and prints its pid).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The turn, unless `SPOOL_NO_TURN` is set.
fn take_turn() -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var_os("SPOOL_NO_TURN").is_some() {
        return None;
    }
    Some(
        ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// The random seed: `SPOOL_TEST_SEED` to replay a failure (the messages print it), else new.
fn test_seed() -> u64 {
    std::env::var("SPOOL_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

// ---------------------------------------------------------------------------------------
// Stamped blocks

/// Region block `block` as written with `generation`: magic, block, generation, then bytes
/// seeded by all three.
fn stamp(magic: u64, block: u64, generation: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    out[0..8].copy_from_slice(&magic.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&generation.to_le_bytes());
    fastrand::Rng::with_seed(generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block ^ magic)
        .fill(&mut out[24..]);
    out
}

/// Which origin generation region block `block` holds (`None`: zeros), or what is wrong.
fn decode(block: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    if word(0) == CLONE_MAGIC {
        return Err("holds a clone's write".into());
    }
    if word(0) != ORIGIN_MAGIC {
        return Err(format!(
            "not a block the writer wrote ({:02x?})",
            &data[..16]
        ));
    }
    if word(8) != block {
        return Err(format!("holds block {} (misplaced)", word(8)));
    }
    let generation = word(16);
    if data != stamp(ORIGIN_MAGIC, block, generation) {
        return Err(format!("generation {generation}, torn or corrupted"));
    }
    Ok(Some(generation))
}

// ---------------------------------------------------------------------------------------
// The origin's writer and what it did

/// One write of a block, as the writer saw it.
#[derive(Clone, Copy, Debug)]
struct Write {
    generation: u64,
    /// Taken just before the request was sent.
    sent: Instant,
    /// Taken just after its reply arrived (`None`: no reply).
    acked: Option<Instant>,
}

#[derive(Default, Clone)]
struct BlockHistory {
    /// What it held before `writes` (`None`: zeros), as last read back after a kill.
    base: Option<u64>,
    /// Writes since, in order (never two in flight at once).
    writes: Vec<Write>,
    busy: bool,
}

struct Writes {
    blocks: Vec<BlockHistory>,
    next_generation: u64,
    acks: u64,
    /// The daemon is being killed: a broken connection is expected from now on.
    killed: bool,
    errors: Vec<String>,
}

impl Writes {
    fn new() -> Writes {
        Writes {
            blocks: vec![BlockHistory::default(); REGION_BLOCKS as usize],
            next_generation: 1,
            acks: 0,
            killed: false,
            errors: Vec::new(),
        }
    }

    /// The problems of `data` (the region, read from a view taken between `begin` and
    /// `end`): each block must hold a write sent before `end`, no older than the last one
    /// acknowledged before `begin`.
    fn check_view(&self, what: &str, data: &[u8], begin: Instant, end: Instant) -> Vec<String> {
        let mut problems = Vec::new();
        for (block, history) in self.blocks.iter().enumerate() {
            let at = block * BLOCK as usize;
            let got = match decode(block as u64, &data[at..at + BLOCK as usize]) {
                Ok(got) => got,
                Err(why) => {
                    problems.push(format!("{what}: block {block} {why}"));
                    continue;
                }
            };
            let floor = history
                .writes
                .iter()
                .rposition(|w| w.acked.is_some_and(|acked| acked < begin));
            let mut allowed: Vec<Option<u64>> = Vec::new();
            if floor.is_none() {
                allowed.push(history.base);
            }
            allowed.extend(
                history.writes[floor.unwrap_or(0)..]
                    .iter()
                    .filter(|w| w.sent < end)
                    .map(|w| Some(w.generation)),
            );
            if !allowed.contains(&got) {
                let describe = |w: &Write| {
                    format!(
                        "{} (sent {:+?}, acked {:?})",
                        w.generation,
                        signed(w.sent, begin),
                        w.acked.map(|a| signed(a, begin))
                    )
                };
                problems.push(format!(
                    "{what}: block {block} holds generation {got:?}, allowed {allowed:?} \
                     (call took {:?}; writes relative to its start: {})",
                    end - begin,
                    history
                        .writes
                        .iter()
                        .rev()
                        .take(4)
                        .map(describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        problems
    }

    /// After a kill: what the origin holds now (read back and checked) becomes each block's
    /// base.
    fn rebase(&mut self, data: &[u8]) {
        for (block, history) in self.blocks.iter_mut().enumerate() {
            let at = block * BLOCK as usize;
            history.base = decode(block as u64, &data[at..at + BLOCK as usize]).unwrap();
            history.writes.clear();
            history.busy = false;
        }
    }
}

/// `a - b` in signed milliseconds, for messages.
fn signed(a: Instant, b: Instant) -> String {
    if a >= b {
        format!("+{:.3}ms", (a - b).as_secs_f64() * 1e3)
    } else {
        format!("-{:.3}ms", (b - a).as_secs_f64() * 1e3)
    }
}

/// Writes stamped blocks (1 to 4 at a time) to random places of the origin's region at queue
/// depth 8 until `stop` is set or the connection breaks.
fn writer(port: u16, model: Arc<Mutex<Writes>>, stop: Arc<AtomicBool>, seed: u64) {
    let fail = |model: &Mutex<Writes>, what: String| {
        let mut m = model.lock().unwrap();
        if !m.killed {
            m.errors.push(what);
        }
    };
    let mut client = match NbdClient::connect(port, "origin") {
        Ok(client) => client,
        Err(err) => return fail(&model, format!("connect: {err}")),
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pending: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut handle = 0u64;
    loop {
        while pending.len() < 8 && !stop.load(Ordering::Relaxed) {
            let count = [1u64, 1, 1, 2, 4][rng.usize(..5)];
            let first = rng.u64(..REGION_BLOCKS - count + 1);
            let generation = {
                let mut m = model.lock().unwrap();
                let range = first as usize..(first + count) as usize;
                if m.blocks[range.clone()].iter().any(|b| b.busy) {
                    break;
                }
                let generation = m.next_generation;
                m.next_generation += 1;
                let sent = Instant::now();
                for block in &mut m.blocks[range] {
                    block.busy = true;
                    block.writes.push(Write {
                        generation,
                        sent,
                        acked: None,
                    });
                }
                generation
            };
            let mut payload = Vec::with_capacity((count * BLOCK) as usize);
            for block in first..first + count {
                payload.extend(stamp(ORIGIN_MAGIC, block, generation));
            }
            handle += 1;
            if let Err(err) = client.send_write(handle, REGION_START + first * BLOCK, &payload, 0) {
                return fail(&model, format!("send: {err}"));
            }
            pending.insert(handle, (first, count));
        }
        if pending.is_empty() {
            client.disconnect();
            return;
        }
        let reply = match client.reply() {
            Ok(reply) => reply,
            Err(err) => return fail(&model, format!("reply: {err}")),
        };
        let acked = Instant::now();
        let Some((first, count)) = pending.remove(&reply.handle) else {
            return fail(
                &model,
                format!("a reply to unknown handle {}", reply.handle),
            );
        };
        if reply.error != 0 {
            return fail(
                &model,
                format!("a write of blocks {first}+{count} failed: {}", reply.error),
            );
        }
        let mut m = model.lock().unwrap();
        m.acks += 1;
        for block in &mut m.blocks[first as usize..(first + count) as usize] {
            block.busy = false;
            block.writes.last_mut().expect("the write in flight").acked = Some(acked);
        }
    }
}

/// The writer, running.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(port: u16, model: &Arc<Mutex<Writes>>, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (model, flag) = (Arc::clone(model), Arc::clone(&stop));
        let thread = std::thread::spawn(move || writer(port, model, flag, seed));
        Writer { stop, thread }
    }

    /// Stops it (its writes in flight are answered first, unless the daemon is gone).
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the writer panicked");
    }
}

/// Waits until the writer has had `more` more writes acknowledged (it is writing).
fn wait_for_acks(model: &Mutex<Writes>, more: u64) {
    let from = model.lock().unwrap().acks;
    let deadline = Instant::now() + ACK_LIMIT;
    loop {
        {
            let m = model.lock().unwrap();
            assert!(m.errors.is_empty(), "writer: {:?}", m.errors);
            if m.acks >= from + more {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the writer got no {more} acknowledgements in {ACK_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------
// Reading a volume's region

/// Reads `REGION_BLOCKS` blocks from `REGION_START` of export `name` (64 blocks a READ, 8 in
/// flight); with the export's transmission flags.
fn read_region(port: u16, name: &str) -> (Vec<u8>, u16) {
    let mut client =
        NbdClient::connect(port, name).unwrap_or_else(|err| panic!("connect to {name}: {err}"));
    let flags = client.flags;
    let mut data = vec![0u8; (REGION_BLOCKS * BLOCK) as usize];
    let chunk = 64u64;
    let chunks = REGION_BLOCKS / chunk;
    let (mut next, mut in_flight) = (0u64, 0usize);
    let mut done = 0;
    while done < chunks {
        while next < chunks && in_flight < 8 {
            client
                .send_read(
                    next,
                    REGION_START + next * chunk * BLOCK,
                    (chunk * BLOCK) as u32,
                )
                .expect("send a READ");
            next += 1;
            in_flight += 1;
        }
        let reply = client.reply().expect("a READ reply");
        assert_eq!(reply.error, 0, "{name}: READ {} failed", reply.handle);
        let at = (reply.handle * chunk * BLOCK) as usize;
        data[at..at + reply.data.len()].copy_from_slice(&reply.data);
        in_flight -= 1;
        done += 1;
    }
    client.disconnect();
    (data, flags)
}

/// Asserts `got == want` without printing megabytes.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: region block {} differs (byte {at}: got {:#04x}, want {:#04x})",
            at as u64 / BLOCK,
            got[at],
            want[at]
        );
    }
}

// ---------------------------------------------------------------------------------------
// JSON-RPC

/// A call's answer: the result, or the error's code and message.
type Answer = Result<Value, (i32, String)>;

fn call(socket: &Path, method: &str, params: Value) -> Option<Answer> {
    let answer = spool_engine::rpc::client::call(socket, method, Some(params), RPC_LIMIT).ok()?;
    Some(answer.map_err(|err| (err.code, err.message)))
}

struct Rpc {
    socket: PathBuf,
}

impl Rpc {
    /// `method`, which must answer (the daemon is alive).
    fn answer(&self, method: &str, params: Value) -> Answer {
        let shown = params.to_string();
        call(&self.socket, method, params)
            .unwrap_or_else(|| panic!("{method} {shown}: no answer from the daemon"))
    }

    fn ok(&self, method: &str, params: Value) -> Value {
        let shown = params.to_string();
        self.answer(method, params)
            .unwrap_or_else(|(code, message)| panic!("{method} {shown}: {code} {message}"))
    }

    fn fails(&self, method: &str, params: Value) -> i32 {
        let shown = params.to_string();
        match self.answer(method, params) {
            Ok(result) => panic!("{method} {shown} succeeded ({result}), should fail"),
            Err((code, _)) => code,
        }
    }

    fn export(&self, lvol: &str, name: &str) {
        let answer = self.ok(
            "nbd_start_export",
            json!({"bdev_name": format!("lvs0/{lvol}"), "export_name": name}),
        );
        assert_eq!(answer, json!(name));
    }

    /// Stops an export; a client that just left may be counted a moment longer (-EBUSY).
    fn unexport(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.answer("nbd_stop_export", json!({"export_name": name})) {
                Ok(_) => return,
                Err((code, message)) => assert!(
                    code == -libc::EBUSY && Instant::now() < deadline,
                    "nbd_stop_export {name}: {code} {message}"
                ),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn lvols(&self) -> BTreeMap<String, String> {
        let list = self.ok("bdev_lvol_get_lvols", json!({}));
        list.as_array()
            .expect("lvols")
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_string(),
                    l["uuid"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn export_size(&self, name: &str) -> u64 {
        let list = self.ok("nbd_get_exports", json!({"export_name": name}));
        list[0]["size"].as_u64().expect("size")
    }
}

// ---------------------------------------------------------------------------------------
// The loop

/// How a snapshot goes at the end of an iteration: merged into the origin (its only clone
/// left), or deleted after the origin stopped reading through it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Release {
    Merge,
    Decouple,
    Inflate,
}

/// The steps of one iteration, in order; a kill comes in the middle of one's call.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
enum Step {
    Snapshot,
    ReadSnapshot,
    Clone,
    WriteClone,
    Refusals,
    Resize,
    DeleteClone,
    TakeOver,
    DeleteSnapshot,
}

/// What a test knows of an lvol it made or deleted.
#[derive(Clone, Debug, PartialEq)]
enum Known {
    /// Its call answered success: it is there, with this uuid.
    Present(String),
    /// Its create was in flight at the kill: there or not (uuid unknown).
    MaybeCreated,
    /// Its delete was in flight at the kill: there or not.
    MaybeDeleted(String),
    /// Deleted: never seen again.
    Gone,
}

/// A snapshot as the test saw it.
struct SnapshotRecord {
    /// The call's window (`end`: its answer, or the kill).
    begin: Instant,
    end: Instant,
    /// Its region as read back (checked).
    content: Option<Vec<u8>>,
}

/// A clone: its snapshot, and its own (acknowledged) writes: region block, generation.
struct CloneRecord {
    snapshot: String,
    writes: Vec<(u64, u64)>,
}

/// Where to kill the daemon.
#[derive(Clone, Copy, Debug)]
struct KillPoint {
    iteration: usize,
    step: Step,
    delay: Duration,
}

/// The loop's state, across iterations (and kills).
struct Live {
    daemon: Option<Daemon>,
    rpc: Rpc,
    model: Arc<Mutex<Writes>>,
    lvols: BTreeMap<String, Known>,
    snapshots: BTreeMap<String, SnapshotRecord>,
    clones: BTreeMap<String, CloneRecord>,
    kill: Option<KillPoint>,
    /// When the kill came (the daemon is gone).
    killed_at: Option<Instant>,
    /// How long each kind of call took (for messages, and to aim kills).
    timings: Vec<(Step, Duration)>,
    seed: u64,
}

impl Live {
    fn port(&self) -> u16 {
        self.daemon.as_ref().expect("the daemon runs").port
    }

    /// Runs the persistent call of `step` (or kills the daemon in its middle, when the kill
    /// point says so); `None` when the daemon was killed before it answered.
    fn op(&mut self, iteration: usize, step: Step, method: &str, params: Value) -> Option<Answer> {
        let kill = self
            .kill
            .filter(|k| k.iteration == iteration && k.step == step);
        let Some(kill) = kill else {
            let begin = Instant::now();
            let answer = self.rpc.answer(method, params);
            self.timings.push((step, begin.elapsed()));
            return Some(answer);
        };
        let socket = self.rpc.socket.clone();
        let method_owned = method.to_string();
        let caller = std::thread::spawn(move || call(&socket, &method_owned, params));
        // The delay places the kill in the call: not a synchronization.
        std::thread::sleep(kill.delay);
        self.model.lock().unwrap().killed = true;
        self.killed_at = Some(Instant::now());
        self.daemon.take().expect("the daemon runs").kill9();
        let answer = caller.join().expect("the caller panicked");
        eprintln!(
            "seed {}: killed {:?} after {:?} in {method}: {}",
            self.seed,
            kill.delay,
            step,
            match &answer {
                Some(Ok(_)) => "it had answered success".to_string(),
                Some(Err((code, message))) => format!("it had failed: {code} {message}"),
                None => "no answer".to_string(),
            }
        );
        answer
    }

    /// Whether the daemon still runs (no kill yet).
    fn alive(&self) -> bool {
        self.daemon.is_some()
    }

    /// Records a create's outcome; whether the daemon still runs.
    fn created(&mut self, name: &str, answer: Option<Answer>) -> bool {
        match answer {
            Some(Ok(uuid)) => {
                let uuid = uuid.as_str().expect("a uuid").to_string();
                self.lvols.insert(name.into(), Known::Present(uuid));
            }
            Some(Err((code, message))) => panic!("creating {name}: {code} {message}"),
            None => {
                self.lvols.insert(name.into(), Known::MaybeCreated);
            }
        }
        self.alive()
    }

    /// Records a delete's outcome; whether the daemon still runs.
    fn deleted(&mut self, name: &str, answer: Option<Answer>) -> bool {
        match answer {
            Some(Ok(_)) => {
                self.lvols.insert(name.into(), Known::Gone);
            }
            Some(Err((code, message))) => panic!("deleting {name}: {code} {message}"),
            None => {
                let Some(Known::Present(uuid)) = self.lvols.get(name).cloned() else {
                    panic!("deleting {name}, which is not known present");
                };
                self.lvols.insert(name.into(), Known::MaybeDeleted(uuid));
            }
        }
        self.alive()
    }

    /// Checks a call that changes no lvol succeeded (if it answered); whether the daemon
    /// still runs.
    fn acked(&mut self, answer: Option<Answer>, what: &str) -> bool {
        if let Some(Err((code, message))) = answer {
            panic!("{what}: {code} {message}");
        }
        self.alive()
    }

    /// One iteration: snapshot the origin while it is written, read the snapshot (point in
    /// time), clone it, export and write the clone, check the refusals, resize the origin,
    /// delete the clone, then the snapshot (merged, or after a decouple or inflate), and read
    /// the origin while it is written. Returns false when the daemon was killed.
    fn iteration(&mut self, round: usize, iteration: usize, rng: &mut fastrand::Rng) -> bool {
        let snap = format!("snap{round}_{iteration}");
        let clone = format!("clone{round}_{iteration}");
        let mut drop_way = [
            Release::Merge,
            Release::Merge,
            Release::Decouple,
            Release::Inflate,
        ][rng.usize(..4)];
        if self
            .kill
            .is_some_and(|k| k.iteration == iteration && k.step == Step::TakeOver)
            && drop_way == Release::Merge
        {
            drop_way = Release::Decouple;
        }
        // Let the writer run a little: the snapshot comes while it writes.
        wait_for_acks(&self.model, rng.u64(16..128));

        // Snapshot.
        let begin = Instant::now();
        let answer = self.op(
            iteration,
            Step::Snapshot,
            "bdev_lvol_snapshot",
            json!({"lvol_name": "lvs0/origin", "snapshot_name": snap}),
        );
        let end = self.killed_at.unwrap_or_else(Instant::now);
        self.snapshots.insert(
            snap.clone(),
            SnapshotRecord {
                begin,
                end,
                content: None,
            },
        );
        if !self.created(&snap, answer) {
            return false;
        }

        // Its point-in-time image, exported read-only.
        let exported = self.op(
            iteration,
            Step::ReadSnapshot,
            "nbd_start_export",
            json!({"bdev_name": format!("lvs0/{snap}"), "export_name": snap}),
        );
        if !self.acked(exported, "exporting the snapshot") {
            return false;
        }
        let (content, flags) = read_region(self.port(), &snap);
        assert_ne!(
            flags & transmission_flags::READ_ONLY,
            0,
            "{snap} is read-only"
        );
        let problems = self
            .model
            .lock()
            .unwrap()
            .check_view(&snap, &content, begin, end);
        assert!(
            problems.is_empty(),
            "seed {}: snapshot {snap} is not point-in-time: {} problem(s):\n{}",
            self.seed,
            problems.len(),
            problems[..problems.len().min(10)].join("\n")
        );
        self.snapshots.get_mut(&snap).unwrap().content = Some(content.clone());

        // Its clone: exported, reads as the snapshot, written on its own.
        let answer = self.op(
            iteration,
            Step::Clone,
            "bdev_lvol_clone",
            json!({"snapshot_name": format!("lvs0/{snap}"), "clone_name": clone}),
        );
        self.clones.insert(
            clone.clone(),
            CloneRecord {
                snapshot: snap.clone(),
                writes: Vec::new(),
            },
        );
        if !self.created(&clone, answer) {
            return false;
        }
        let exported = self.op(
            iteration,
            Step::WriteClone,
            "nbd_start_export",
            json!({"bdev_name": format!("lvs0/{clone}"), "export_name": clone}),
        );
        if !self.acked(exported, "exporting the clone") {
            return false;
        }
        let (before, flags) = read_region(self.port(), &clone);
        assert_eq!(
            flags & transmission_flags::READ_ONLY,
            0,
            "{clone} is writable"
        );
        assert_same(&format!("{clone} before its writes"), &before, &content);
        let mut client = NbdClient::connect(self.port(), &clone).expect("connect to the clone");
        let mut expected = content.clone();
        for _ in 0..rng.usize(4..24) {
            let block = rng.u64(..REGION_BLOCKS);
            let generation = iteration as u64 + 1;
            let data = stamp(CLONE_MAGIC, block, generation);
            let error = client
                .write(REGION_START + block * BLOCK, &data)
                .expect("a write to the clone");
            assert_eq!(error, 0, "a write to {clone}");
            let at = (block * BLOCK) as usize;
            expected[at..at + BLOCK as usize].copy_from_slice(&data);
            let record = self.clones.get_mut(&clone).unwrap();
            record.writes.push((block, generation));
        }
        // And a cluster fio writes on the origin: the clone's own, too.
        assert_eq!(client.write(0, &[0xc1; 64 << 10]).unwrap(), 0);
        assert_eq!(client.read(0, 64 << 10).unwrap(), vec![0xc1; 64 << 10]);
        client.disconnect();
        let (after, _) = read_region(self.port(), &clone);
        assert_same(&format!("{clone} after its writes"), &after, &expected);
        let (again, _) = read_region(self.port(), &snap);
        assert_same(
            &format!("{snap} after its clone was written"),
            &again,
            &content,
        );

        // Refusals: an exported lvol, a snapshot with two clones (the origin and the clone).
        let refused = self.op(
            iteration,
            Step::Refusals,
            "bdev_lvol_delete",
            json!({"name": format!("lvs0/{clone}")}),
        );
        if let Some(answer) = refused {
            assert_eq!(
                answer.map_err(|(code, _)| code),
                Err(-libc::EBUSY),
                "deleting the exported {clone}"
            );
        }
        if !self.alive() {
            return false;
        }
        assert_eq!(
            self.rpc
                .fails("bdev_lvol_delete", json!({"name": format!("lvs0/{snap}")})),
            -libc::EBUSY,
            "deleting the exported {snap}"
        );
        self.rpc.unexport(&snap);
        assert_eq!(
            self.rpc
                .fails("bdev_lvol_delete", json!({"name": format!("lvs0/{snap}")})),
            -libc::EBUSY,
            "deleting {snap}, which has two clones"
        );

        // Resize the origin (grow, or shrink back: never into the regions written).
        let mib = rng.u64(ORIGIN_MIB..=ORIGIN_MIB + 8);
        let answer = self.op(
            iteration,
            Step::Resize,
            "bdev_lvol_resize",
            json!({"name": "lvs0/origin", "size_in_mib": mib}),
        );
        if !self.acked(answer, "resizing the origin") {
            return false;
        }
        assert_eq!(self.rpc.export_size("origin"), mib * MIB);

        // Delete the clone.
        self.rpc.unexport(&clone);
        let answer = self.op(
            iteration,
            Step::DeleteClone,
            "bdev_lvol_delete",
            json!({"name": format!("lvs0/{clone}")}),
        );
        if !self.deleted(&clone, answer) {
            return false;
        }

        // The snapshot goes: merged into the origin, or after the origin is decoupled from
        // it or inflated.
        let method = match drop_way {
            Release::Merge => None,
            Release::Decouple => Some("bdev_lvol_decouple_parent"),
            Release::Inflate => Some("bdev_lvol_inflate"),
        };
        if let Some(method) = method {
            let answer = self.op(
                iteration,
                Step::TakeOver,
                method,
                json!({"name": "lvs0/origin"}),
            );
            if !self.acked(answer, method) {
                return false;
            }
        }
        let answer = self.op(
            iteration,
            Step::DeleteSnapshot,
            "bdev_lvol_delete",
            json!({"name": format!("lvs0/{snap}")}),
        );
        if !self.deleted(&snap, answer) {
            return false;
        }

        // The origin, read while it is written.
        let begin = Instant::now();
        let (data, _) = read_region(self.port(), "origin");
        let end = Instant::now();
        let problems = self
            .model
            .lock()
            .unwrap()
            .check_view("origin", &data, begin, end);
        assert!(
            problems.is_empty(),
            "seed {}: the origin after iteration {iteration} ({drop_way:?}): {} problem(s):\n{}",
            self.seed,
            problems.len(),
            problems[..problems.len().min(10)].join("\n")
        );
        true
    }
}

/// `spool init --lvs lvs0` on a 256 MiB image and a thin `origin`.
fn make_store(dir: &Path) {
    spool(dir, &["init", IMAGE, "--size", "256M", "--lvs", "lvs0"]);
    spool(
        dir,
        &[
            "create",
            IMAGE,
            "--size",
            &format!("{ORIGIN_MIB}M"),
            "--thin",
            "--name",
            "origin",
        ],
    );
}

/// The daemon on the store, exporting only the origin.
fn serve(dir: &Path) -> Daemon {
    Daemon::start(dir, IMAGE, &["--cores", "0,1", "--export", "origin"])
}

/// The done-when loop of issue 14 under fio: snapshot, read it (point in time), clone,
/// export and write the clone, refuse to delete what is exported or has two clones, resize
/// the origin, delete the clone, delete the snapshot (merged, or after a decouple or an
/// inflate), read the origin, while fio writes with crc32c verify and a writer of ours
/// writes stamped blocks; then fio reports no verify error, the origin holds every last
/// write, and the store has every cluster owned once.
#[test]
fn live_loop_under_fio_keeps_snapshots_point_in_time_and_fio_verify_clean() {
    let _turn = take_turn();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d);
    let seed = test_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let daemon = serve(d);
    let uri = format!("--uri={}", daemon.uri("origin"));
    let fio_size = format!("--size={FIO_MIB}M");
    let fio = spawn_client(
        d,
        "fio",
        &[
            "--name=live",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            &fio_size,
            "--loops=100000",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ],
    );
    let model = Arc::new(Mutex::new(Writes::new()));
    let writer = Writer::start(daemon.port, &model, rng.u64(..));
    let mut live = Live {
        rpc: Rpc {
            socket: daemon.rpc_socket(),
        },
        daemon: Some(daemon),
        model: Arc::clone(&model),
        lvols: BTreeMap::new(),
        snapshots: BTreeMap::new(),
        clones: BTreeMap::new(),
        kill: None,
        killed_at: None,
        timings: Vec::new(),
        seed,
    };
    for iteration in 0..10 {
        assert!(live.iteration(0, iteration, &mut rng), "no kill was asked");
    }
    // fio ran the whole loop: stop it (SIGINT: it reports and exits 128).
    daemon::signal(fio.pid(), "INT");
    let fio = fio.wait(Duration::from_secs(60));
    writer.stop();
    let json_at = fio
        .stdout
        .find('{')
        .unwrap_or_else(|| panic!("no fio report: {fio:?}"));
    let report: Value = serde_json::from_str(&fio.stdout[json_at..]).expect("fio's report");
    let job = &report["jobs"][0];
    let stray: Vec<&str> = fio
        .stderr
        .lines()
        .filter(|line| {
            !line.trim().is_empty()
                && !line.contains("connected to NBD server")
                && !line.contains("terminating on signal 2")
        })
        .collect();
    assert!(
        stray.is_empty(),
        "seed {seed}: fio reported:\n{}",
        fio.stderr
    );
    assert_eq!(job["error"], 0, "seed {seed}: fio's job failed: {job}");
    assert_eq!(
        fio.status.code(),
        Some(128),
        "fio stopped by SIGINT: {fio:?}"
    );
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    let verified = job["read"]["io_bytes"].as_u64().unwrap();
    assert!(
        written > 0 && verified > 0,
        "fio wrote {written}, verified {verified}"
    );

    // Quiet now: the origin holds exactly every block's last write.
    let now = Instant::now();
    let (data, _) = read_region(live.port(), "origin");
    let m = model.lock().unwrap();
    assert!(m.errors.is_empty(), "writer: {:?}", m.errors);
    let problems = m.check_view("origin at the end", &data, now, now);
    assert!(problems.is_empty(), "seed {seed}: {problems:?}");
    let acks = m.acks;
    drop(m);
    let lvols = live.rpc.lvols();
    assert_eq!(lvols.keys().collect::<Vec<_>>(), ["origin"], "{lvols:?}");
    live.daemon.take().unwrap().stop();
    check_clusters_owned_once(d, IMAGE);
    eprintln!(
        "live loop (seed {seed}, {:?}): writer {acks} writes, fio wrote {written} and verified \
         {verified} bytes; calls: {:?}",
        started.elapsed(),
        live.timings
    );
}

// ---------------------------------------------------------------------------------------
// kill -9 in the loop

impl Live {
    /// After a kill, offline: the store loads (and is recovered) with `spool info`, and a
    /// command that writes (setting the super blob it has) writes the recovery back; every
    /// cluster is owned once and none leaked, and `spool ls` has every lvol the test knows
    /// of, by name and uuid: those whose call answered success and were not deleted, never a
    /// deleted one, and either way those whose call the kill interrupted (settled here).
    fn check_offline(&mut self, round: usize) {
        let dir = self
            .rpc
            .socket
            .parent()
            .expect("the socket's dir")
            .to_path_buf();
        let info = spool_json(&dir, &["info", IMAGE]);
        assert_eq!(info["lvs_name"], "lvs0", "seed {}: {info}", self.seed);
        // `info` only reads (a dirty store is recovered in memory and stays dirty on disk),
        // and `dump` reads the masks on disk: let a command that writes recover it for good.
        let super_blob = info["super_blob"]
            .as_u64()
            .expect("an lvol store's super blob");
        spool(&dir, &["super", IMAGE, &format!("{super_blob:#x}")]);
        check_clusters_owned_once(&dir, IMAGE);
        let listed = spool_json(&dir, &["ls", IMAGE]);
        let on_disk: BTreeMap<String, String> = listed
            .as_array()
            .expect("blobs")
            .iter()
            .filter(|blob| blob.get("alias").is_some())
            .map(|blob| {
                (
                    blob["name"].as_str().expect("a name").to_string(),
                    blob["uuid"].as_str().expect("a uuid").to_string(),
                )
            })
            .collect();
        self.settle(&on_disk, &format!("round {round}, offline"));
    }

    /// Compares `found` (name to uuid) with what the test knows, and settles what the kill
    /// left open.
    fn settle(&mut self, found: &BTreeMap<String, String>, when: &str) {
        let seed = self.seed;
        for name in found.keys() {
            assert!(
                self.lvols.contains_key(name),
                "seed {seed}, {when}: lvol {name} was never made: {found:?}"
            );
        }
        for (name, known) in self.lvols.iter_mut() {
            let there = found.get(name);
            match (known.clone(), there) {
                (Known::Present(uuid), Some(got)) | (Known::MaybeDeleted(uuid), Some(got)) => {
                    assert_eq!(got, &uuid, "seed {seed}, {when}: lvol {name}'s uuid");
                    *known = Known::Present(uuid);
                }
                (Known::Present(uuid), None) => {
                    panic!("seed {seed}, {when}: lvol {name} ({uuid}) is lost: {found:?}")
                }
                (Known::MaybeCreated, Some(got)) => {
                    assert_eq!(got.len(), 36, "seed {seed}, {when}: {name}'s uuid {got}");
                    *known = Known::Present(got.clone());
                }
                (Known::MaybeCreated, None) | (Known::MaybeDeleted(_), None) => {
                    *known = Known::Gone;
                }
                (Known::Gone, Some(got)) => {
                    panic!("seed {seed}, {when}: lvol {name} ({got}) was deleted, but is back")
                }
                (Known::Gone, None) => {}
            }
        }
    }

    fn present(&self, name: &str) -> bool {
        matches!(self.lvols.get(name), Some(Known::Present(_)))
    }

    /// After a restart: the daemon has the same lvols; the origin holds every acknowledged
    /// write (or a later one in flight at the kill); every snapshot left holds what it was
    /// read with (or, not read yet, a point-in-time image of its call's window, the kill
    /// ending it); every clone left holds its snapshot and its own writes. Then the
    /// leftovers are deleted (clones, then snapshots, merged into the origin), the origin
    /// reads the same, and becomes the writer's new base.
    fn check_restarted(&mut self, round: usize) {
        let seed = self.seed;
        let when = format!("round {round}, restarted");
        let listed = self.rpc.lvols();
        self.settle(&listed, &when);
        let port = self.port();
        let now = Instant::now();
        let (origin, _) = read_region(port, "origin");
        let problems =
            self.model
                .lock()
                .unwrap()
                .check_view("the origin after the kill", &origin, now, now);
        assert!(
            problems.is_empty(),
            "seed {seed}, {when}: {} problem(s):\n{}",
            problems.len(),
            problems[..problems.len().min(10)].join("\n")
        );
        let snapshots: Vec<String> = self
            .snapshots
            .keys()
            .filter(|name| self.present(name))
            .cloned()
            .collect();
        let mut contents = BTreeMap::new();
        for snap in &snapshots {
            self.rpc.export(snap, snap);
            let (data, flags) = read_region(port, snap);
            assert_ne!(
                flags & transmission_flags::READ_ONLY,
                0,
                "{snap} is read-only"
            );
            let record = &self.snapshots[snap];
            match &record.content {
                Some(content) => {
                    assert_same(&format!("seed {seed}, {when}: {snap}"), &data, content)
                }
                None => {
                    let problems = self.model.lock().unwrap().check_view(
                        snap,
                        &data,
                        record.begin,
                        record.end,
                    );
                    assert!(
                        problems.is_empty(),
                        "seed {seed}, {when}: snapshot {snap}, taken as the daemon was killed, \
                         is not point-in-time: {} problem(s):\n{}",
                        problems.len(),
                        problems[..problems.len().min(10)].join("\n")
                    );
                }
            }
            contents.insert(snap.clone(), data);
        }
        let clones: Vec<String> = self
            .clones
            .keys()
            .filter(|name| self.present(name))
            .cloned()
            .collect();
        for clone in &clones {
            let record = &self.clones[clone];
            let mut expected = contents
                .get(&record.snapshot)
                .unwrap_or_else(|| {
                    panic!(
                        "seed {seed}, {when}: clone {clone} is there, its snapshot {} is not",
                        record.snapshot
                    )
                })
                .clone();
            for &(block, generation) in &record.writes {
                let at = (block * BLOCK) as usize;
                expected[at..at + BLOCK as usize].copy_from_slice(&stamp(
                    CLONE_MAGIC,
                    block,
                    generation,
                ));
            }
            self.rpc.export(clone, clone);
            let (data, _) = read_region(port, clone);
            assert_same(&format!("seed {seed}, {when}: {clone}"), &data, &expected);
            self.rpc.unexport(clone);
            let deleted = self
                .rpc
                .answer("bdev_lvol_delete", json!({"name": format!("lvs0/{clone}")}));
            self.deleted(clone, Some(deleted));
        }
        for snap in &snapshots {
            self.rpc.unexport(snap);
            let deleted = self
                .rpc
                .answer("bdev_lvol_delete", json!({"name": format!("lvs0/{snap}")}));
            self.deleted(snap, Some(deleted));
        }
        let (after, _) = read_region(port, "origin");
        assert_same(
            &format!("seed {seed}, {when}: the origin after the leftovers went"),
            &after,
            &origin,
        );
        assert_eq!(
            self.rpc.lvols().keys().collect::<Vec<_>>(),
            ["origin"],
            "seed {seed}, {when}"
        );
        let mut m = self.model.lock().unwrap();
        m.rebase(&origin);
        m.killed = false;
        self.killed_at = None;
    }
}

/// Where kills go: a step of the loop (the persistent calls, more often those that move
/// clusters) and how far into its call (up to about twice what it takes here).
fn kill_point(rng: &mut fastrand::Rng) -> KillPoint {
    let (step, most_us) = [
        (Step::Snapshot, 8_000),
        (Step::Snapshot, 8_000),
        (Step::Snapshot, 8_000),
        (Step::ReadSnapshot, 1_000),
        (Step::Clone, 2_000),
        (Step::Clone, 2_000),
        (Step::Resize, 4_000),
        (Step::DeleteClone, 15_000),
        (Step::DeleteClone, 15_000),
        (Step::TakeOver, 40_000),
        (Step::TakeOver, 40_000),
        (Step::DeleteSnapshot, 25_000),
        (Step::DeleteSnapshot, 25_000),
        (Step::DeleteSnapshot, 25_000),
    ][rng.usize(..14)];
    KillPoint {
        iteration: rng.usize(..2),
        step,
        delay: Duration::from_micros(rng.u64(..most_us)),
    }
}

/// kill -9 at seeded points of the live loop (in the middle of a snapshot, clone, resize,
/// delete, merge, decouple or inflate while the writer writes): each time the store loads
/// offline with every lvol's name and uuid (those whose call succeeded and were not
/// deleted; a call the kill interrupted may go either way), every cluster owned once and
/// none leaked; the restarted daemon has the same lvols, the origin every acknowledged
/// write, each snapshot its point-in-time image, each clone its own writes.
#[test]
fn kill_9_in_the_live_loop_keeps_every_lvol_cluster_and_acknowledged_write() {
    let _turn = take_turn();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d);
    let seed = test_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let listed = spool_json(d, &["ls", IMAGE]);
    let origin_uuid = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|blob| blob["name"] == "origin")
        .map(|blob| blob["uuid"].as_str().unwrap().to_string())
        .expect("the origin");
    let model = Arc::new(Mutex::new(Writes::new()));
    let mut live = Live {
        daemon: None,
        rpc: Rpc {
            socket: d.join("rpc.sock"),
        },
        model: Arc::clone(&model),
        lvols: BTreeMap::from([("origin".to_string(), Known::Present(origin_uuid.clone()))]),
        snapshots: BTreeMap::new(),
        clones: BTreeMap::new(),
        kill: None,
        killed_at: None,
        timings: Vec::new(),
        seed,
    };
    const ROUNDS: usize = 6;
    let mut report = Vec::new();
    for round in 0..ROUNDS {
        live.daemon = Some(serve(d));
        if round > 0 {
            live.check_restarted(round);
        }
        let writer = Writer::start(live.port(), &model, rng.u64(..));
        let kill = kill_point(&mut rng);
        live.kill = Some(kill);
        let mut iteration = 0;
        while live.iteration(round, iteration, &mut rng) {
            iteration += 1;
        }
        writer.stop();
        {
            let m = model.lock().unwrap();
            assert!(
                m.errors.is_empty(),
                "seed {seed}, round {round}: {:?}",
                m.errors
            );
        }
        report.push(format!("round {round}: {kill:?}"));
        live.check_offline(round);
    }
    // The last restart checks the last kill; then a clean stop leaves the origin alone.
    live.daemon = Some(serve(d));
    live.check_restarted(ROUNDS);
    live.daemon.take().unwrap().stop();
    check_clusters_owned_once(d, IMAGE);
    let listed = spool_json(d, &["ls", IMAGE]);
    let lvols: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|blob| blob.get("alias").is_some())
        .map(|blob| {
            (
                blob["name"].as_str().unwrap(),
                blob["uuid"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(lvols, [("origin", origin_uuid.as_str())]);
    eprintln!(
        "kill loop (seed {seed}, {:?}):\n{}",
        started.elapsed(),
        report.join("\n")
    );
}
