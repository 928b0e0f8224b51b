//! Goal: the io_uring bdev stores and returns data correctly through the shared per-reactor
//! ring, at queue depth, with vectored I/O, unmap/write-zeroes/flush, several reactors and
//! several bdevs, and fails cleanly on bad requests and bad paths. Method: real reactors
//! (idle mode Adaptive: they sleep in the kernel while idle or waiting on the ring, so parallel
//! tests do not spin each other off the 2 cores, and every test exercises the ring's wake-up) on a temp file
//! in the current filesystem; each test checks data byte for byte.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, DmaBuf, UringBdev, UringOptions};
use spool_reactor::{spawn_local, IdleMode, ReactorId, Runtime, RuntimeOptions};

const FILE_LEN: u64 = 32 << 20;

fn runtime(cores: usize) -> Runtime {
    let available = std::thread::available_parallelism().map_or(1, usize::from);
    Runtime::start(&RuntimeOptions {
        cores: (0..cores.min(available)).collect(),
        idle: IdleMode::Adaptive,
        pin: false,
    })
    .expect("runtime")
}

fn temp_file(len: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).expect("tempfile");
    file.as_file().set_len(len).expect("set_len");
    file
}

fn open(path: &Path) -> Arc<UringBdev> {
    Arc::new(UringBdev::open(path, &UringOptions::default()).expect("open uring bdev"))
}

fn pattern(buf: &mut [u8], seed: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = (i as u64)
            .wrapping_mul(0x9e37_79b9)
            .wrapping_add(seed.wrapping_mul(31));
        *b = (x ^ (x >> 11) ^ seed) as u8;
    }
}

fn patterned(len: usize, seed: u64) -> DmaBuf {
    let mut buf = DmaBuf::alloc(len).expect("alloc");
    pattern(&mut buf, seed);
    buf
}

fn expected(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern(&mut v, seed);
    v
}

/// Runs every future as its own task on this reactor and collects the results in order.
async fn join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let handles: Vec<_> = futures.into_iter().map(spawn_local).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

#[test]
fn read_after_write_at_queue_depth() {
    let stats = read_after_write_with_submit_batch(spool_bdev::DEFAULT_SUBMIT_BATCH);
    let ios = 32 * 8 * 2;
    assert!(
        stats.enters >= ios / u64::from(spool_bdev::DEFAULT_SUBMIT_BATCH),
        "a full batch is submitted at once: {} enters for {ios} I/Os",
        stats.enters
    );
}

#[test]
fn read_after_write_submitting_each_sqe_at_once() {
    let stats = read_after_write_with_submit_batch(1);
    assert!(
        stats.enters >= 32 * 8 * 2,
        "one enter per SQE: {}",
        stats.enters
    );
}

#[test]
fn read_after_write_submitting_once_per_pass() {
    read_after_write_with_submit_batch(0);
}

/// Writes and reads back 32 x 8 patterned 16 KiB requests at queue depth 32 with the given
/// `submit_batch`, checks the data and the counters, and returns the group's counters.
fn read_after_write_with_submit_batch(submit_batch: u32) -> spool_bdev::UringGroupStats {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let options = UringOptions {
        submit_batch,
        ..UringOptions::default()
    };
    let bdev = Arc::new(UringBdev::open(file.path(), &options).expect("open uring bdev"));
    assert_eq!(bdev.block_size(), 4096);
    assert_eq!(bdev.block_count(), FILE_LEN / 4096);
    let desc = BdevDesc::open(bdev.clone()).expect("open bdev");
    let stats = rt
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            const DEPTH: u64 = 32;
            const ROUNDS: u64 = 8;
            // Each worker owns offsets worker, worker + DEPTH, ... (16 KiB each).
            let workers = (0..DEPTH)
                .map(|worker| {
                    let channel = channel.clone();
                    async move {
                        for round in 0..ROUNDS {
                            let offset = (round * DEPTH + worker) * 16384;
                            let seed = offset + 7;
                            let (r, _) = channel.write(patterned(16384, seed), offset).await;
                            r.unwrap();
                        }
                        for round in 0..ROUNDS {
                            let offset = (round * DEPTH + worker) * 16384;
                            let (r, buf) = channel
                                .read(DmaBuf::alloc_zeroed(16384).unwrap(), offset)
                                .await;
                            r.unwrap();
                            assert!(buf[..] == expected(16384, offset + 7)[..], "at {offset}");
                        }
                    }
                })
                .collect();
            join_all(workers).await;
            assert_eq!(channel.in_flight(), 0);
            bdev.group_stats().unwrap()
        })
        .unwrap();
    let ios = 32 * 8 * 2;
    assert_eq!(stats.sqes_pushed, ios);
    assert_eq!(stats.completions, ios);
    if submit_batch != 1 {
        assert!(
            stats.enters < ios,
            "submissions are batched: {} enters for {ios} I/Os",
            stats.enters
        );
    }
    if stats.fixed_regions > 0 {
        assert_eq!(stats.fixed_rw, ios, "DmaBuf I/O uses the fixed opcodes");
    }
    assert_eq!(rt.stop().leaked_channels, 0);
    stats
}

#[test]
fn vectored_io_crossing_block_and_buffer_boundaries() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let desc = BdevDesc::open(open(file.path())).expect("open bdev");
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let offset = 5 * 4096;
        let bufs = vec![patterned(6144, 1), patterned(2048, 2), patterned(4096, 3)];
        let mut want = Vec::new();
        for b in &bufs {
            want.extend_from_slice(b);
        }
        let (r, back) = channel.writev(bufs, offset).await;
        r.unwrap();
        assert_eq!(
            back.iter().map(DmaBuf::len).collect::<Vec<_>>(),
            [6144, 2048, 4096]
        );
        // Read back with a different split, and with one buffer.
        let split = vec![
            DmaBuf::alloc_zeroed(2048).unwrap(),
            DmaBuf::alloc_zeroed(8192).unwrap(),
            DmaBuf::alloc_zeroed(1024).unwrap(),
            DmaBuf::alloc_zeroed(1024).unwrap(),
        ];
        let (r, split) = channel.readv(split, offset).await;
        r.unwrap();
        let got: Vec<u8> = split.iter().flat_map(|b| b.iter().copied()).collect();
        assert!(got == want);
        let (r, one) = channel
            .read(DmaBuf::alloc_zeroed(12288).unwrap(), offset)
            .await;
        r.unwrap();
        assert!(one[..] == want[..]);
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn data_survives_closing_and_reopening() {
    let file = temp_file(FILE_LEN);
    for round in 0..2u64 {
        let rt = runtime(1);
        let desc = BdevDesc::open(open(file.path())).expect("open bdev");
        rt.block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            if round == 0 {
                let (r, _) = channel.write(patterned(65536, 99), 1 << 20).await;
                r.unwrap();
                channel.flush().await.unwrap();
            } else {
                let (r, buf) = channel.read(DmaBuf::alloc(65536).unwrap(), 1 << 20).await;
                r.unwrap();
                assert!(buf[..] == expected(65536, 99)[..]);
            }
        })
        .unwrap();
        assert_eq!(rt.stop().leaked_channels, 0);
    }
}

async fn check_unmap_and_write_zeroes(desc: BdevDesc, base: u64) {
    let channel = desc.channel().unwrap();
    let (r, _) = channel.write(patterned(65536, 5), base).await;
    r.unwrap();
    channel.unmap(base + 8192, 16384).await.unwrap();
    channel.write_zeroes(base + 32768, 16384).await.unwrap();
    let (r, buf) = channel.read(DmaBuf::alloc(65536).unwrap(), base).await;
    r.unwrap();
    let want = expected(65536, 5);
    assert!(buf[..8192] == want[..8192], "left neighbour intact");
    assert!(
        buf[8192..24576].iter().all(|&b| b == 0),
        "unmapped range reads zeros"
    );
    assert!(buf[24576..32768] == want[24576..32768], "middle intact");
    assert!(
        buf[32768..49152].iter().all(|&b| b == 0),
        "zeroed range reads zeros"
    );
    assert!(buf[49152..] == want[49152..], "right neighbour intact");
    // A long write-zeroes, more than one fallback chunk.
    channel.write_zeroes(base, 3 << 20).await.unwrap();
    let (r, buf) = channel.read(DmaBuf::alloc(3 << 20).unwrap(), base).await;
    r.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    channel.flush().await.unwrap();
}

#[test]
fn unmap_write_zeroes_and_flush() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let bdev = open(file.path());
    assert!(spool_bdev::Bdev::unmap_reads_zeroes(bdev.as_ref()));
    let desc = BdevDesc::open(bdev).expect("open bdev");
    rt.block_on(ReactorId(0), move || {
        check_unmap_and_write_zeroes(desc, 4 << 20)
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn zero_fill_fallback_on_tmpfs() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE: write_zeroes must fall back to writing zeros.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipping");
        return;
    }
    let file = tempfile::NamedTempFile::new_in(shm).expect("tempfile");
    file.as_file().set_len(8 << 20).expect("set_len");
    let rt = runtime(1);
    let bdev = open(file.path());
    let desc = BdevDesc::open(bdev.clone()).expect("open bdev");
    rt.block_on(ReactorId(0), move || {
        check_unmap_and_write_zeroes(desc, 1 << 20)
    })
    .unwrap();
    if !bdev.write_zeroes_writes_zeros() {
        eprintln!("note: tmpfs accepted ZERO_RANGE here; the fallback was not exercised");
    }
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn bad_requests_get_einval_and_never_reach_the_ring() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let bdev = open(file.path());
    let desc = BdevDesc::open(bdev.clone()).expect("open bdev");
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        channel.flush().await.unwrap();
        let pushed = bdev.group_stats().unwrap().sqes_pushed;
        let size = channel.size_bytes();
        for (offset, len) in [
            (1, 4096),
            (512, 4096),
            (0, 1000),
            (size, 4096),
            (size - 4096, 8192),
        ] {
            let (r, buf) = channel.read(DmaBuf::alloc(len).unwrap(), offset).await;
            assert_eq!(
                r.unwrap_err().errno(),
                -libc::EINVAL,
                "read {len} at {offset}"
            );
            assert_eq!(buf.len(), len);
            let (r, _) = channel.write(DmaBuf::alloc(len).unwrap(), offset).await;
            assert_eq!(
                r.unwrap_err().errno(),
                -libc::EINVAL,
                "write {len} at {offset}"
            );
        }
        // An iovec length that is not a multiple of 512 under O_DIRECT.
        if bdev.is_direct() {
            let bufs = vec![DmaBuf::alloc(100).unwrap(), DmaBuf::alloc(3996).unwrap()];
            let (r, _) = channel.readv(bufs, 0).await;
            assert_eq!(r.unwrap_err().errno(), -libc::EINVAL);
        }
        assert_eq!(
            channel.unmap(4096, 0).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(
            channel.write_zeroes(size, 4096).await.unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(channel.in_flight(), 0);
        assert_eq!(
            bdev.group_stats().unwrap().sqes_pushed,
            pushed,
            "nothing reached the ring"
        );
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn two_reactors_use_their_own_rings_on_one_file() {
    let rt = runtime(2);
    if rt.reactors().len() < 2 {
        eprintln!("one CPU only; skipping");
        return;
    }
    let file = temp_file(FILE_LEN);
    let bdev = open(file.path());
    let desc = BdevDesc::open(bdev.clone()).expect("open bdev");
    let mut handles = Vec::new();
    for reactor in 0..2u32 {
        let desc = desc.clone();
        let bdev = bdev.clone();
        handles.push(
            rt.spawn_on(ReactorId(reactor), move || async move {
                let channel = desc.channel().unwrap();
                let base = u64::from(reactor) * (8 << 20);
                let workers = (0..8u64)
                    .map(|i| {
                        let channel = channel.clone();
                        async move {
                            let offset = base + i * 65536;
                            let (r, _) = channel.write(patterned(65536, offset), offset).await;
                            r.unwrap();
                            let (r, buf) =
                                channel.read(DmaBuf::alloc(65536).unwrap(), offset).await;
                            r.unwrap();
                            assert!(buf[..] == expected(65536, offset)[..]);
                        }
                    })
                    .collect();
                join_all(workers).await;
                bdev.group_stats().unwrap().group_id
            })
            .unwrap(),
        );
    }
    let ids: Vec<u64> = handles
        .into_iter()
        .map(|h| h.wait().expect("reactor task"))
        .collect();
    assert_ne!(ids[0], ids[1], "each reactor has its own ring");
    // Reactor 0 reads what reactor 1 wrote.
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let offset = (8 << 20) + 3 * 65536;
        let (r, buf) = channel.read(DmaBuf::alloc(65536).unwrap(), offset).await;
        r.unwrap();
        assert!(buf[..] == expected(65536, offset)[..]);
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn two_bdevs_on_one_reactor_share_one_ring() {
    let rt = runtime(1);
    let (file_a, file_b) = (temp_file(FILE_LEN), temp_file(FILE_LEN));
    let (a, b) = (open(file_a.path()), open(file_b.path()));
    let (desc_a, desc_b) = (
        BdevDesc::open(a.clone()).expect("open bdev"),
        BdevDesc::open(b.clone()).expect("open bdev"),
    );
    rt.block_on(ReactorId(0), move || async move {
        let (ca, cb) = (desc_a.channel().unwrap(), desc_b.channel().unwrap());
        let (ra, rb) = futures_pair(
            ca.write(patterned(4096, 1), 0),
            cb.write(patterned(4096, 2), 0),
        )
        .await;
        ra.0.unwrap();
        rb.0.unwrap();
        let (sa, sb) = (a.group_stats().unwrap(), b.group_stats().unwrap());
        assert_eq!(sa.group_id, sb.group_id, "one ring per reactor");
        assert_eq!(sa.channels, 2);
        let (r, buf) = ca.read(DmaBuf::alloc(4096).unwrap(), 0).await;
        r.unwrap();
        assert!(buf[..] == expected(4096, 1)[..]);
        let (r, buf) = cb.read(DmaBuf::alloc(4096).unwrap(), 0).await;
        r.unwrap();
        assert!(buf[..] == expected(4096, 2)[..]);
        drop(cb);
        assert_eq!(
            a.group_stats().unwrap().channels,
            1,
            "b's channel left the ring"
        );
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

/// Awaits two futures concurrently (both were already submitted when created).
async fn futures_pair<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    (a.await, b.await)
}

#[test]
fn a_channel_destroyed_with_io_in_flight_drains_it() {
    let rt = runtime(1);
    let (file_a, file_b) = (temp_file(FILE_LEN), temp_file(FILE_LEN));
    let (a, b) = (open(file_a.path()), open(file_b.path()));
    let (desc_a, desc_b) = (
        BdevDesc::open(a.clone()).expect("open bdev"),
        BdevDesc::open(b).expect("open bdev"),
    );
    let stats_of = a.clone();
    rt.block_on(ReactorId(0), move || async move {
        let a = stats_of;
        let keep = desc_a.channel().unwrap();
        for round in 0..4u64 {
            let cb = desc_b.channel().unwrap();
            // Submitted at creation, then abandoned: buffers stay parked in the slots.
            let futures: Vec<_> = (0..16u64)
                .map(|i| cb.write(patterned(65536, i), (round * 16 + i) * 65536))
                .collect();
            drop(futures);
            drop(cb);
            // a's channel keeps the ring alive; it must still work.
            let (r, _) = keep.write(patterned(4096, round), 0).await;
            r.unwrap();
        }
        for _ in 0..10_000 {
            if a.group_stats().unwrap().channels == 1 {
                break;
            }
            spool_reactor::sleep(std::time::Duration::from_micros(100)).await;
        }
        assert_eq!(
            a.group_stats().unwrap().channels,
            1,
            "drained entries were removed"
        );
        assert_eq!(a.group_stats().unwrap().in_flight, 0);
    })
    .unwrap();
    // A runtime stopped with requests in flight: tasks cancelled, channels destroyed cleanly.
    let desc = BdevDesc::open(a).expect("open bdev");
    rt.spawn_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        loop {
            let (r, _) = channel.read(DmaBuf::alloc(65536).unwrap(), 0).await;
            r.unwrap();
        }
    })
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(rt.stop().leaked_channels, 0);
}

/// Reads `len` bytes at `offset` of `path` with plain std I/O.
fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open")
        .read_exact_at(&mut out, offset)
        .expect("read_exact_at");
    out
}

/// Sleeps on the reactor until `done()` holds (at most ~2 s); returns whether it did.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..20_000 {
        if done() {
            return true;
        }
        spool_reactor::sleep(std::time::Duration::from_micros(100)).await;
    }
    done()
}

#[test]
fn a_closed_channels_queued_writes_land_on_its_own_file_only() {
    let rt = runtime(1);
    let (file_keep, file_a, file_b) = (
        temp_file(FILE_LEN),
        temp_file(FILE_LEN),
        temp_file(FILE_LEN),
    );
    let (keep, a, b) = (
        open(file_keep.path()),
        open(file_a.path()),
        open(file_b.path()),
    );
    let stats_of = keep.clone();
    let (desc_keep, desc_a, desc_b) = (
        BdevDesc::open(keep).expect("open bdev"),
        BdevDesc::open(a).expect("open bdev"),
        BdevDesc::open(b).expect("open bdev"),
    );
    const WRITES: u64 = 16;
    const LEN: usize = 65536;
    rt.block_on(ReactorId(0), move || async move {
        // Keeps the reactor's ring (and so its file table) alive throughout.
        let keep = desc_keep.channel().unwrap();
        for round in 0..4u64 {
            let ca = desc_a.channel().unwrap();
            // Pushed to the ring but not submitted yet (the group poller submits once this
            // task yields); then the channel is destroyed at once.
            let futures: Vec<_> = (0..WRITES)
                .map(|i| ca.write(patterned(LEN, round * 100 + i), i * LEN as u64))
                .collect();
            drop(futures);
            drop(ca);
            assert!(
                stats_of.group_stats().unwrap().channels >= 2,
                "the closed channel's entry (and file slot) stays while its SQEs are queued"
            );
            // Another bdev's channel on the same ring takes a file slot right away, and
            // writes somewhere else on its own file.
            let cb = desc_b.channel().unwrap();
            let (r, _) = cb.write(patterned(4096, 7), FILE_LEN - 4096).await;
            r.unwrap();
            drop(cb);
            assert!(
                eventually(|| stats_of.group_stats().unwrap().channels == 1).await,
                "drained entries are removed"
            );
            let (r, _) = keep.write(patterned(4096, round), 0).await;
            r.unwrap();
        }
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
    for i in 0..WRITES {
        assert!(
            file_bytes(file_a.path(), i * LEN as u64, LEN) == expected(LEN, 300 + i),
            "write {i} of the closed channel reached its own file"
        );
    }
    assert!(
        file_bytes(file_b.path(), 0, WRITES as usize * LEN)
            .iter()
            .all(|&b| b == 0),
        "none of a's writes landed on b's file"
    );
    assert!(file_bytes(file_b.path(), FILE_LEN - 4096, 4096) == expected(4096, 7));
}

#[test]
fn dropping_the_last_channel_with_io_in_flight_does_not_block_the_reactor() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let bdev = open(file.path());
    let desc = BdevDesc::open(bdev).expect("open bdev");
    const WRITES: u64 = 16;
    const LEN: usize = 1 << 20;
    rt.block_on(ReactorId(0), move || async move {
        let uring_pollers = || {
            spool_reactor::stats()
                .unwrap()
                .pollers
                .iter()
                .filter(|&&n| n == "uring-group")
                .count()
        };
        let channel = desc.channel().unwrap();
        let before = UringBdev::draining_rings();
        // 16 MiB of writes pushed (not even submitted yet), then abandoned with the reactor's
        // only uring channel.
        let futures: Vec<_> = (0..WRITES)
            .map(|i| channel.write(patterned(LEN, i), i * LEN as u64))
            .collect();
        drop(futures);
        let start = std::time::Instant::now();
        drop(channel);
        let drop_took = start.elapsed();
        // The group outlives its last channel, still polled, instead of blocking here.
        assert_eq!(
            UringBdev::draining_rings(),
            before + 1,
            "the ring drains in the background"
        );
        assert_eq!(uring_pollers(), 1);
        assert_eq!(spool_reactor::stats().unwrap().channels, 0);
        // The reactor keeps running timers while the kernel writes.
        let mut ticks = 0u32;
        while UringBdev::draining_rings() > before {
            spool_reactor::sleep(std::time::Duration::from_micros(100)).await;
            ticks += 1;
            assert!(ticks < 100_000, "the draining ring never finished");
        }
        assert!(ticks > 0, "a timer fired while the ring drained");
        // Drained: its poller is gone too (removed at the end of the pass that drained it).
        spool_reactor::sleep(std::time::Duration::from_micros(100)).await;
        assert_eq!(
            uring_pollers(),
            0,
            "the drained group's poller unregistered itself"
        );
        eprintln!("drop took {drop_took:?}; {ticks} timer ticks while draining");
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
    for i in 0..WRITES {
        assert!(
            file_bytes(file.path(), i * LEN as u64, LEN) == expected(LEN, i),
            "abandoned write {i} completed"
        );
    }
}

#[test]
fn reads_past_a_shrunk_file_fail_with_eio() {
    let rt = runtime(1);
    let file = temp_file(1 << 20);
    let desc = BdevDesc::open(open(file.path())).expect("open bdev");
    let path = file.path().to_path_buf();
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(512 << 10)
            .unwrap();
        let (r, _) = channel.read(DmaBuf::alloc(8192).unwrap(), 768 << 10).await;
        assert_eq!(r.unwrap_err().errno(), -libc::EIO, "whole read past EOF");
        let (r, _) = channel
            .read(DmaBuf::alloc(8192).unwrap(), (512 << 10) - 4096)
            .await;
        assert_eq!(r.unwrap_err().errno(), -libc::EIO, "read straddling EOF");
        let (r, _) = channel.read(DmaBuf::alloc(8192).unwrap(), 0).await;
        r.unwrap();
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn open_errors_name_the_path_and_carry_the_errno() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let missing = dir.path().join("missing");
    let err = UringBdev::open(&missing, &UringOptions::default()).unwrap_err();
    assert_eq!(err.errno(), -libc::ENOENT);
    assert!(err.to_string().contains("missing"), "{err}");

    let err = UringBdev::open(dir.path(), &UringOptions::default()).unwrap_err();
    assert_eq!(err.errno(), -libc::EISDIR, "{err}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );

    let small = dir.path().join("small");
    std::fs::write(&small, [0u8; 100]).unwrap();
    let err = UringBdev::open(&small, &UringOptions::default()).unwrap_err();
    assert_eq!(err.errno(), -libc::EINVAL, "{err}");
    assert!(
        err.to_string().contains("small") && err.to_string().contains("100"),
        "{err}"
    );

    let file = temp_file(1 << 20);
    for options in [
        UringOptions {
            block_size: 1000,
            ..UringOptions::default()
        },
        UringOptions {
            ring_entries: 0,
            ..UringOptions::default()
        },
        UringOptions {
            sqpoll_cpu: Some(0),
            ..UringOptions::default()
        },
    ] {
        let err = UringBdev::open(file.path(), &options).unwrap_err();
        assert_eq!(err.errno(), -libc::EINVAL, "{options:?}: {err}");
    }
    // The file size is rounded down to a block multiple.
    let odd = temp_file((1 << 20) + 100);
    let bdev = UringBdev::open(odd.path(), &UringOptions::default()).unwrap();
    assert_eq!(bdev.block_count(), 256);
}

#[test]
fn buffered_mode_works_and_relaxes_iovec_alignment() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let bdev = Arc::new(
        UringBdev::open(
            file.path(),
            &UringOptions {
                direct: false,
                name: Some("buffered0".into()),
                ..UringOptions::default()
            },
        )
        .unwrap(),
    );
    assert!(!bdev.is_direct());
    assert_eq!(spool_bdev::Bdev::iov_len_align(bdev.as_ref()), 1);
    assert_eq!(spool_bdev::Bdev::name(bdev.as_ref()), "buffered0");
    let desc = BdevDesc::open(bdev).expect("open bdev");
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let bufs = vec![patterned(100, 1), patterned(3996, 2), patterned(4096, 3)];
        let (r, _) = channel.writev(bufs, 8192).await;
        r.unwrap();
        let (r, buf) = channel.read(DmaBuf::alloc(8192).unwrap(), 8192).await;
        r.unwrap();
        assert!(buf[..100] == expected(100, 1)[..]);
        assert!(buf[100..4096] == expected(3996, 2)[..]);
        assert!(buf[4096..] == expected(4096, 3)[..]);
        check_unmap_and_write_zeroes(desc, 1 << 20).await;
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn loop_block_device_opt_in() {
    if std::env::var("SPOOL_TEST_LOOP").as_deref() != Ok("1") {
        eprintln!("SPOOL_TEST_LOOP=1 not set; skipping the loop-device test");
        return;
    }
    let backing = temp_file(FILE_LEN);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", "--direct-io=on"])
        .arg(backing.path())
        .output()
        .expect("run losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(device.clone());
    let bdev = open(Path::new(&device));
    assert!(bdev.is_block_device());
    assert_eq!(bdev.block_size(), 512);
    assert_eq!(bdev.block_count() * 512, FILE_LEN);
    assert!(!spool_bdev::Bdev::unmap_reads_zeroes(bdev.as_ref()));
    let rt = runtime(1);
    let desc = BdevDesc::open(bdev).expect("open bdev");
    rt.block_on(ReactorId(0), move || async move {
        let channel = desc.channel().unwrap();
        let (r, _) = channel.write(patterned(65536, 3), 4096).await;
        r.unwrap();
        let (r, buf) = channel.read(DmaBuf::alloc(65536).unwrap(), 4096).await;
        r.unwrap();
        assert!(buf[..] == expected(65536, 3)[..]);
        // Discard on a loop device punches the backing file: it reads zeros here.
        check_unmap_and_write_zeroes(desc, 1 << 20).await;
    })
    .unwrap();
    assert_eq!(rt.stop().leaked_channels, 0);
}

#[test]
fn a_full_submission_queue_parks_requests_and_retries_them() {
    let rt = runtime(1);
    let file = temp_file(FILE_LEN);
    let small_ring = UringOptions {
        ring_entries: 4,
        ..UringOptions::default()
    };
    let bdev = Arc::new(UringBdev::open(file.path(), &small_ring).unwrap());
    let desc = BdevDesc::open(bdev.clone()).expect("open bdev");
    let stats = rt
        .block_on(ReactorId(0), move || async move {
            let channel = desc.channel().unwrap();
            let workers = (0..64u64)
                .map(|i| {
                    let channel = channel.clone();
                    async move {
                        let offset = i * 8192;
                        let (r, _) = channel.write(patterned(8192, i), offset).await;
                        r.unwrap();
                        let (r, buf) = channel.read(DmaBuf::alloc(8192).unwrap(), offset).await;
                        r.unwrap();
                        assert!(buf[..] == expected(8192, i)[..]);
                    }
                })
                .collect();
            join_all(workers).await;
            bdev.group_stats().unwrap()
        })
        .unwrap();
    assert!(stats.overflowed > 0, "{stats:?}");
    assert_eq!(stats.completions, 128);
    assert_eq!(rt.stop().leaked_channels, 0);
}

/// Rough random-read IOPS at QD1 and QD32 (compare with fio). Run with
/// `cargo test --release -p spool-bdev --test uring -- --ignored --nocapture randread`.
#[test]
#[ignore = "benchmark; run explicitly"]
fn randread_iops_probe() {
    const LEN: u64 = 256 << 20;
    let file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..(LEN >> 20) {
        std::io::Write::write_all(&mut file.as_file(), &chunk).unwrap();
    }
    file.as_file().sync_all().unwrap();
    let rt = Runtime::start(&RuntimeOptions {
        cores: vec![1],
        idle: IdleMode::Busy,
        pin: true,
    })
    .unwrap();
    for depth in [1u64, 32] {
        let desc = BdevDesc::open(open(file.path())).expect("open bdev");
        let (ios, secs) = rt
            .block_on(ReactorId(0), move || async move {
                let channel = desc.channel().unwrap();
                let start = std::time::Instant::now();
                let workers = (0..depth)
                    .map(|w| {
                        let channel = channel.clone();
                        async move {
                            let mut buf = DmaBuf::alloc(4096).unwrap();
                            let mut n = 0u64;
                            let mut x = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                            while start.elapsed().as_secs_f64() < 3.0 {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                let (r, back) = channel.read(buf, (x % (LEN / 4096)) * 4096).await;
                                r.unwrap();
                                buf = back;
                                n += 1;
                            }
                            n
                        }
                    })
                    .collect();
                let total: u64 = join_all(workers).await.into_iter().sum();
                (total, start.elapsed().as_secs_f64())
            })
            .unwrap();
        eprintln!("QD{depth}: {:.0} IOPS", ios as f64 / secs);
    }
    rt.stop();
}

/// `reserve` allocates a sparse file's range (fallocate) without changing its size or its
/// zeros; a read-only open reserves nothing and refuses writes before the kernel.
#[test]
fn reserve_allocates_a_files_range_and_read_only_opens_refuse_writes() {
    use std::os::unix::fs::MetadataExt;
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(16 << 20).unwrap();
    let allocated = || std::fs::metadata(file.path()).unwrap().blocks() * 512;
    assert!(allocated() < 1 << 20, "a sparse file to start with");
    let bdev = open(file.path());
    bdev.reserve(4 << 20, 8 << 20).unwrap();
    assert!(allocated() >= 8 << 20, "reserved: {} bytes", allocated());
    assert_eq!(std::fs::metadata(file.path()).unwrap().len(), 16 << 20);
    drop(bdev);
    let read_only = UringBdev::open(
        file.path(),
        &UringOptions {
            read_only: true,
            ..UringOptions::default()
        },
    )
    .unwrap();
    assert!(read_only.reserve(0, 16 << 20).is_ok());
    assert!(allocated() < 9 << 20, "a read-only open reserves nothing");
    assert!(read_only.supports(spool_bdev::IoKind::Read));
    assert!(!read_only.supports(spool_bdev::IoKind::Write));
    assert!(!read_only.supports(spool_bdev::IoKind::Unmap));
}
