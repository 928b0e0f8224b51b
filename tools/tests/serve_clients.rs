//! Goal: `spool serve` works with the NBD clients people use, none written here: qemu-io,
//! qemu-img, nbdcopy, nbdinfo and fio's nbd engine (issue 12, "Done when"); and a kill -9
//! while a client writes loses nothing that was promised durable, and leaves a store that
//! recovers with every cluster owned once.
//!
//! Method: each test makes a store in a temporary directory with the offline CLI, starts the
//! built `spool serve` on it (127.0.0.1, a port the kernel picks), runs the clients against
//! it with a time limit, and stops it with SIGTERM (exit 0, store clean). Data is checked
//! byte for byte, and where it matters after a restart of the daemon. The kill test speaks
//! NBD itself (the engine's wire codec) so it knows exactly which writes were acknowledged
//! and which FLUSHes covered them. A missing client fails the test (`.ci/run` installs
//! them); nothing is skipped. docs/nbd.md ("Tested with real clients") lists what each test
//! checks.

mod daemon;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::{
    check_clusters_owned_once, run_client, spawn_client, spool, spool_json, ClientRun, Daemon,
    NbdClient,
};
use spool_engine::nbd::wire::{command_flags, transmission_flags, Errno};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Clients get this long per run before the test fails.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "store.img";

/// `spool init store.img --size SIZE` and a thin volume per `(name, size)`.
fn make_store(dir: &Path, size: &str, volumes: &[(&str, &str)]) {
    spool(dir, &["init", IMAGE, "--size", size]);
    for (name, size) in volumes {
        spool(
            dir,
            &["create", IMAGE, "--size", size, "--thin", "--name", name],
        );
    }
}

/// `len` bytes that do not compress (seeded).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut out);
    out
}

/// Asserts `a == b` without printing megabytes: the first differing offset.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(at) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {at} (cluster {}): got {:#04x}, want {:#04x}",
            at as u64 / MIB,
            got[at],
            want[at]
        );
    }
}

// ---------------------------------------------------------------------------------------
// qemu-io

/// A qemu-io pattern region: `write -P pattern offset len` / `read -P pattern offset len`.
#[derive(Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
    pattern: u8,
}

fn region(offset: u64, len: u64, pattern: u8) -> Region {
    Region {
        offset,
        len,
        pattern,
    }
}

/// `-c 'VERB -P PATTERN OFFSET LEN'` for each region.
fn qemu_io_commands(verb: &str, regions: &[Region]) -> Vec<String> {
    let mut args = Vec::new();
    for r in regions {
        args.push("-c".to_string());
        args.push(format!(
            "{verb} -P {:#04x} {} {}",
            r.pattern, r.offset, r.len
        ));
    }
    args
}

/// Runs qemu-io on `uri` (read-only with `-r`) with `commands`.
fn spawn_qemu_io(
    dir: &Path,
    uri: &str,
    read_only: bool,
    commands: &[String],
) -> daemon::RunningClient {
    let mut args: Vec<&str> = vec!["-f", "raw"];
    if read_only {
        args.push("-r");
    }
    args.push(uri);
    args.extend(commands.iter().map(String::as_str));
    spawn_client(dir, "qemu-io", &args)
}

/// Checks a qemu-io run succeeded and no command in it failed (qemu-io exits 1 when one
/// did, and prints why).
fn qemu_io_ok(run: ClientRun) {
    let run = run.ok();
    for bad in ["failed", "error", "Error"] {
        assert!(
            !run.stdout.contains(bad) && !run.stderr.contains(bad),
            "{}: {bad}:\n{}\n{}",
            run.command,
            run.stdout,
            run.stderr
        );
    }
}

/// What each export gets: pattern writes at cluster starts, inside clusters, over a cluster
/// boundary, at the very end, and one smaller than the io unit (qemu does the
/// read-modify-write); later regions overwrite parts of earlier ones.
fn volume_regions(base: u8) -> Vec<Region> {
    vec![
        region(0, MIB, base),
        region(3 * MIB, 64 * KIB, base + 1),
        region(7 * MIB + 4 * KIB, 8 * KIB, base + 2),
        region(9 * MIB - 256 * KIB, 512 * KIB, base + 3),
        region(31 * MIB, MIB, base + 4),
        region(5000, 100, base + 5),
        region(12 * MIB, 2 * MIB, base + 6),
        region(12 * MIB + 512 * KIB, 4 * KIB, base + 7),
    ]
}

/// What reads back after `volume_regions` (later writes win) and zeros where none wrote.
fn expected_reads(base: u8) -> Vec<Region> {
    vec![
        region(0, 5000, base),
        region(5000, 100, base + 5),
        region(5100, MIB - 5100, base),
        region(MIB, 2 * MIB, 0),
        region(3 * MIB, 64 * KIB, base + 1),
        region(3 * MIB + 64 * KIB, 4 * MIB - 60 * KIB, 0),
        region(7 * MIB + 4 * KIB, 8 * KIB, base + 2),
        region(7 * MIB + 12 * KIB, 2 * MIB - 268 * KIB, 0),
        region(9 * MIB - 256 * KIB, 512 * KIB, base + 3),
        region(9 * MIB + 256 * KIB, 3 * MIB - 256 * KIB, 0),
        region(12 * MIB, 512 * KIB, base + 6),
        region(12 * MIB + 512 * KIB, 4 * KIB, base + 7),
        region(12 * MIB + 516 * KIB, 2 * MIB - 516 * KIB, base + 6),
        region(14 * MIB, 17 * MIB, 0),
        region(31 * MIB, MIB, base + 4),
    ]
}

#[test]
fn qemu_io_writes_and_reads_patterns_on_two_exports_at_once_and_they_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "128M", &[("a", "32M"), ("b", "32M")]);
    let serving = Daemon::start(d, IMAGE, &["--cores", "0,1"]);
    // Both exports at once, each client writing then reading its own patterns.
    let mut commands = HashMap::new();
    for (export, base) in [("a", 0x10u8), ("b", 0x40u8)] {
        let mut list = qemu_io_commands("write", &volume_regions(base));
        list.extend(qemu_io_commands("read", &expected_reads(base)));
        commands.insert(export, list);
    }
    let a = spawn_qemu_io(d, &serving.uri("a"), false, &commands["a"]);
    let b = spawn_qemu_io(d, &serving.uri("b"), false, &commands["b"]);
    qemu_io_ok(a.wait(CLIENT_LIMIT));
    qemu_io_ok(b.wait(CLIENT_LIMIT));
    serving.stop();

    // A new daemon on the same image reads it all back.
    let serving = Daemon::start(d, IMAGE, &[]);
    assert!(!serving.recovered(), "{:?}", serving.banner);
    for (export, base) in [("a", 0x10u8), ("b", 0x40u8)] {
        let reads = qemu_io_commands("read", &expected_reads(base));
        qemu_io_ok(spawn_qemu_io(d, &serving.uri(export), true, &reads).wait(CLIENT_LIMIT));
    }
    serving.stop();
    check_clusters_owned_once(d, IMAGE);
}

#[test]
fn the_embedded_default_serves_vol0_to_the_readme_qemu_io_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `spool serve` with no IMAGE: spool.img (1 GiB, sparse) with the thin volume vol0.
    let serving = Daemon::start(d, "", &[]);
    assert!(
        serving
            .banner
            .iter()
            .any(|l| l == "spool serve: store spool.img created"),
        "{:?}",
        serving.banner
    );
    assert!(
        serving
            .banner
            .iter()
            .any(|l| l.starts_with("spool serve: export vol0 ") && l.contains("thin")),
        "{:?}",
        serving.banner
    );
    let readme_line = [
        "-c".to_string(),
        "write -P 0xab 0 1M".to_string(),
        "-c".to_string(),
        "read -P 0xab 0 1M".to_string(),
    ];
    qemu_io_ok(spawn_qemu_io(d, &serving.uri("vol0"), false, &readme_line).wait(CLIENT_LIMIT));
    serving.stop();
    // The second start loads it.
    let serving = Daemon::start(d, "", &[]);
    assert!(
        serving
            .banner
            .iter()
            .any(|l| l == "spool serve: store spool.img loaded"),
        "{:?}",
        serving.banner
    );
    let read = qemu_io_commands("read", &[region(0, MIB, 0xab), region(MIB, MIB, 0)]);
    qemu_io_ok(spawn_qemu_io(d, &serving.uri("vol0"), true, &read).wait(CLIENT_LIMIT));
    serving.stop();
    check_clusters_owned_once(d, "spool.img");
}

#[test]
fn a_snapshot_is_exported_read_only_with_the_data_it_was_taken_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "64M", &[("a", "16M")]);
    let serving = Daemon::start(d, IMAGE, &[]);
    let before = [region(0, MIB, 0x11), region(5 * MIB, 4 * KIB, 0x12)];
    qemu_io_ok(
        spawn_qemu_io(
            d,
            &serving.uri("a"),
            false,
            &qemu_io_commands("write", &before),
        )
        .wait(CLIENT_LIMIT),
    );
    serving.stop();
    spool(d, &["snapshot", IMAGE, "a", "--name", "snap"]);

    let serving = Daemon::start(d, IMAGE, &[]);
    assert!(
        serving
            .banner
            .iter()
            .any(|line| line.starts_with("spool serve: export snap") && line.contains("read-only")),
        "{:?}",
        serving.banner
    );
    // qemu-io cannot write it (it refuses to open a read-only export for writing) ...
    let write = spawn_qemu_io(
        d,
        &serving.uri("snap"),
        false,
        &qemu_io_commands("write", &[region(0, 4 * KIB, 0x66)]),
    )
    .wait(CLIENT_LIMIT);
    assert!(
        !write.status.success(),
        "a write to the snapshot succeeded: {write:?}"
    );
    // ... and a client that writes anyway gets EPERM.
    let mut client = NbdClient::connect(serving.port, "snap").unwrap();
    assert_ne!(
        client.flags & transmission_flags::READ_ONLY,
        0,
        "READ_ONLY advertised"
    );
    let error = client.write(0, &[0x66; 4096]).unwrap();
    assert_eq!(error, Errno::Perm.code(), "a WRITE to a snapshot");
    assert_eq!(client.read(0, 4096).unwrap(), vec![0x11; 4096]);
    client.disconnect();
    // The clone (the volume itself) takes writes; the snapshot keeps what it had.
    let after = [region(0, 4 * KIB, 0x77), region(9 * MIB, 4 * KIB, 0x78)];
    let mut clone_commands = qemu_io_commands("write", &after);
    clone_commands.extend(qemu_io_commands(
        "read",
        &[
            region(0, 4 * KIB, 0x77),
            region(4 * KIB, MIB - 4 * KIB, 0x11),
            region(5 * MIB, 4 * KIB, 0x12),
            region(9 * MIB, 4 * KIB, 0x78),
        ],
    ));
    qemu_io_ok(spawn_qemu_io(d, &serving.uri("a"), false, &clone_commands).wait(CLIENT_LIMIT));
    let snap_reads = qemu_io_commands(
        "read",
        &[
            region(0, MIB, 0x11),
            region(5 * MIB, 4 * KIB, 0x12),
            region(9 * MIB, 4 * KIB, 0),
        ],
    );
    qemu_io_ok(spawn_qemu_io(d, &serving.uri("snap"), true, &snap_reads).wait(CLIENT_LIMIT));
    serving.stop();
    check_clusters_owned_once(d, IMAGE);
}

// ---------------------------------------------------------------------------------------
// qemu-img convert, nbdcopy

/// A raw disk image of `clusters` MiB: random data, with whole zero clusters, a run of
/// them, and clusters that are zero only in part.
fn disk_image(seed: u64, clusters: u64) -> (Vec<u8>, u64) {
    let mut image = random_bytes(seed, (clusters * MIB) as usize);
    let mut data_clusters = 0;
    for cluster in 0..clusters {
        let at = (cluster * MIB) as usize;
        let whole = &mut image[at..at + MIB as usize];
        if cluster % 4 == 1 || (clusters / 2..clusters / 2 + 5).contains(&cluster) {
            whole.fill(0);
            continue;
        }
        data_clusters += 1;
        if cluster % 5 == 2 {
            whole[..(MIB / 2) as usize].fill(0);
        }
        if cluster % 7 == 3 {
            whole[(300 * KIB) as usize..(700 * KIB) as usize].fill(0);
        }
    }
    (image, data_clusters)
}

/// Allocated clusters of `name` as `spool ls --json` counts them (the store unloaded).
fn allocated_clusters(dir: &Path, name: &str) -> u64 {
    let ls = spool_json(dir, &["ls", IMAGE]);
    ls.as_array()
        .unwrap()
        .iter()
        .find(|blob| blob["name"] == name)
        .and_then(|blob| blob["num_allocated_clusters"].as_u64())
        .unwrap_or_else(|| panic!("no volume {name}: {ls}"))
}

#[test]
fn qemu_img_convert_copies_a_raw_image_in_and_out_and_a_thin_volume_out_sparsely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "128M", &[("v", "24M"), ("sparse", "64M")]);
    let (image, data_clusters) = disk_image(7, 24);
    std::fs::write(d.join("in.raw"), &image).unwrap();
    let serving = Daemon::start(d, IMAGE, &[]);
    let v = serving.uri("v");
    run_client(
        d,
        "qemu-img",
        // Out-of-order writes, 16 at once.
        &[
            "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", "in.raw", &v,
        ],
        CLIENT_LIMIT,
    )
    .ok();
    run_client(
        d,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &v, "out.raw"],
        CLIENT_LIMIT,
    )
    .ok();
    assert_same(
        "qemu-img convert in and out",
        &std::fs::read(d.join("out.raw")).unwrap(),
        &image,
    );

    // One MiB written in a 64 MiB thin volume: the copy holds one MiB of blocks.
    qemu_io_ok(
        spawn_qemu_io(
            d,
            &serving.uri("sparse"),
            false,
            &qemu_io_commands("write", &[region(40 * MIB, MIB, 0x5a)]),
        )
        .wait(CLIENT_LIMIT),
    );
    run_client(
        d,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &serving.uri("sparse"),
            "sparse.raw",
        ],
        CLIENT_LIMIT,
    )
    .ok();
    serving.stop();
    let copy = std::fs::read(d.join("sparse.raw")).unwrap();
    let mut want = vec![0u8; (64 * MIB) as usize];
    want[(40 * MIB) as usize..(41 * MIB) as usize].fill(0x5a);
    assert_same("the sparse volume's copy", &copy, &want);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(d.join("sparse.raw")).unwrap().blocks() * 512;
    assert!(
        allocated <= 2 * MIB,
        "the copy of a volume with 1 MiB written takes {allocated} bytes on disk (of {})",
        64 * MIB
    );
    // The zero clusters of the source stayed holes in the volume (written as zeroes that
    // needed no allocation).
    assert_eq!(allocated_clusters(d, "v"), data_clusters);
    assert_eq!(allocated_clusters(d, "sparse"), 1);
    check_clusters_owned_once(d, IMAGE);
}

#[test]
fn nbdcopy_round_trips_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "64M", &[("v", "16M")]);
    let (image, data_clusters) = disk_image(11, 16);
    std::fs::write(d.join("in.raw"), &image).unwrap();
    // Two reactors: nbdcopy opens several connections (the export allows multi-conn). In
    // over TCP, out over the Unix socket.
    let socket = d.join("spool.sock");
    let socket = socket.to_str().unwrap();
    let serving = Daemon::start(d, IMAGE, &["--cores", "0,1", "--socket", socket]);
    let v = serving.uri("v");
    run_client(d, "nbdcopy", &["--flush", "in.raw", &v], CLIENT_LIMIT).ok();
    let unix = format!("nbd+unix:///v?socket={socket}");
    run_client(d, "nbdcopy", &[&unix, "out.raw"], CLIENT_LIMIT).ok();
    assert_same(
        "nbdcopy in and out",
        &std::fs::read(d.join("out.raw")).unwrap(),
        &image,
    );
    let connections = serving.log_text().matches("client connected").count();
    serving.stop();
    assert!(connections >= 2, "{connections} connection(s)");
    assert!(allocated_clusters(d, "v") <= data_clusters + 1);
    check_clusters_owned_once(d, IMAGE);
}

// ---------------------------------------------------------------------------------------
// nbdinfo --map

/// `nbdinfo --map URI` as `(offset, length, type)` (type 0 data, 3 hole and zero).
fn nbdinfo_map(dir: &Path, uri: &str) -> Vec<(u64, u64, u32)> {
    let run = run_client(dir, "nbdinfo", &["--map", uri], CLIENT_LIMIT).ok();
    run.stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parse = |i: usize| -> u64 {
                fields
                    .get(i)
                    .and_then(|f| f.parse().ok())
                    .unwrap_or_else(|| panic!("nbdinfo --map line {line:?}"))
            };
            (parse(0), parse(1), parse(2) as u32)
        })
        .collect()
}

/// The expected map of a `clusters` MiB volume with these clusters holding data.
fn expected_map(clusters: u64, data: &[u64]) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    for cluster in 0..clusters {
        let kind = if data.contains(&cluster) { 0 } else { 3 };
        match map.last_mut() {
            Some(last) if last.2 == kind => last.1 += MIB,
            _ => map.push((cluster * MIB, MIB, kind)),
        }
    }
    map
}

#[test]
fn nbdinfo_map_shows_holes_and_data_where_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "64M", &[("m", "32M")]);
    let serving = Daemon::start(d, IMAGE, &[]);
    let m = serving.uri("m");
    assert_eq!(nbdinfo_map(d, &m), expected_map(32, &[]), "a new volume");
    // Whole clusters, two neighbours, 4 KiB inside one, the last one.
    let writes = [
        region(0, MIB, 1),
        region(3 * MIB, 2 * MIB, 2),
        region(10 * MIB + 8 * KIB, 4 * KIB, 3),
        region(31 * MIB + 1020 * KIB, 4 * KIB, 4),
    ];
    qemu_io_ok(spawn_qemu_io(d, &m, false, &qemu_io_commands("write", &writes)).wait(CLIENT_LIMIT));
    let data = [0, 3, 4, 10, 31];
    assert_eq!(
        nbdinfo_map(d, &m),
        expected_map(32, &data),
        "after the writes"
    );
    serving.stop();

    // A clone shows its snapshot's data as data, and its own writes.
    spool(d, &["snapshot", IMAGE, "m", "--name", "snap"]);
    let serving = Daemon::start(d, IMAGE, &[]);
    assert_eq!(
        nbdinfo_map(d, &serving.uri("snap")),
        expected_map(32, &data)
    );
    qemu_io_ok(
        spawn_qemu_io(
            d,
            &serving.uri("m"),
            false,
            &qemu_io_commands("write", &[region(20 * MIB, 4 * KIB, 5)]),
        )
        .wait(CLIENT_LIMIT),
    );
    assert_eq!(
        nbdinfo_map(d, &serving.uri("m")),
        expected_map(32, &[0, 3, 4, 10, 20, 31]),
        "the clone"
    );
    assert_eq!(
        nbdinfo_map(d, &serving.uri("snap")),
        expected_map(32, &data),
        "the snapshot after the clone's write"
    );
    serving.stop();
}

// ---------------------------------------------------------------------------------------
// fio

#[test]
fn fio_randrw_with_crc32c_verify_at_qd16_over_two_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "64M", &[("v", "32M")]);
    let serving = Daemon::start(d, IMAGE, &["--cores", "0,1"]);
    let uri = format!("--uri={}", serving.uri("v"));
    let run = run_client(
        d,
        "fio",
        &[
            "--name=randrw",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=8M",
            "--offset_increment=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ],
        CLIENT_LIMIT,
    );
    let connections = serving.log_text().matches("client connected").count();
    serving.stop();
    let run = run.ok();
    let json_at = run.stdout.find('{').expect("fio's JSON report");
    let report: serde_json::Value =
        serde_json::from_str(&run.stdout[json_at..]).expect("fio's JSON report parses");
    let jobs = report["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "two jobs (two connections)");
    for job in jobs {
        assert_eq!(job["error"], 0, "fio job failed: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "{job}");
        assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0, "{job}");
    }
    assert!(
        !run.stderr.contains("verify") && !run.stdout[..json_at].contains("verify"),
        "fio reported verify trouble: {}",
        run.stderr
    );
    // fio's nbd engine connects once per job to learn the size, then once per job for the
    // I/O: two connections at once.
    assert!(connections >= 2, "{connections} connection(s)");
}

// ---------------------------------------------------------------------------------------
// kill -9 while a client writes

/// Bytes per tracked block (the store's io unit).
const BLOCK: u64 = 4096;
/// The first 8 bytes of every block the kill test writes.
const BLOCK_MAGIC: u64 = 0x5350_4f4f_4c4b_494c; // "SPOOLKIL"

/// Block `slot` as written by `version`: magic, slot, version, then bytes seeded by both.
fn block_content(slot: u64, version: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    out[0..8].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&slot.to_le_bytes());
    out[16..24].copy_from_slice(&version.to_le_bytes());
    fastrand::Rng::with_seed(version.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ slot)
        .fill(&mut out[24..]);
    out
}

/// Which version block `slot` holds (`None`: zeros), or what is wrong with it.
fn decode_block(slot: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    if word(0) != BLOCK_MAGIC {
        return Err(format!(
            "not a block this test wrote (starts {:02x?})",
            &data[..16]
        ));
    }
    if word(8) != slot {
        return Err(format!("holds block {} (misplaced)", word(8)));
    }
    let version = word(16);
    if data != block_content(slot, version) {
        return Err(format!("version {version}, torn or corrupted"));
    }
    Ok(Some(version))
}

/// One write of a block, as the client saw it.
#[derive(Clone, Copy, Debug)]
struct Written {
    version: u64,
    /// The ack clock's tick when its reply came (`None`: no reply before the kill).
    acked_at: Option<u64>,
    fua: bool,
}

#[derive(Default)]
struct Slot {
    /// What it held when the daemon last started (`None`: zeros).
    base: Option<u64>,
    /// Writes since, in order (never two in flight at once).
    writes: Vec<Written>,
    /// A write to it is in flight.
    busy: bool,
}

/// What the writers did, shared by the connections.
struct Model {
    slots: Vec<Slot>,
    next_version: u64,
    /// Acknowledged writes so far: the ack clock.
    acks: u64,
    /// Writes acknowledged at or before this tick are durable: an acknowledged FLUSH was
    /// sent after them (on either connection: the export offers multi-conn).
    durable_upto: u64,
    flushes: u64,
    fuas: u64,
    /// ESHUTDOWN replies (a SIGTERM stop refusing new requests).
    shutdown_replies: u64,
    /// Requests sent that got no reply before the connection broke.
    unanswered: u64,
    /// The daemon was killed or stopped (connections may fail from then on).
    killed: bool,
    /// Replies other than success while the daemon ran.
    errors: Vec<String>,
}

impl Model {
    fn new(slots: u64) -> Model {
        Model {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            next_version: 1,
            acks: 0,
            durable_upto: 0,
            flushes: 0,
            fuas: 0,
            shutdown_replies: 0,
            unanswered: 0,
            killed: false,
            errors: Vec::new(),
        }
    }

    fn durable(&self, w: &Written) -> bool {
        w.acked_at
            .is_some_and(|tick| w.fua || tick <= self.durable_upto)
    }
}

enum Pending {
    Write { first: u64, count: u64 },
    Flush { mark: u64 },
}

/// One connection writing numbered blocks at queue depth 16, a FLUSH every `flush_every`
/// requests and FUA on every `fua_every`-th write, to random slots below `limit`, until
/// the connection breaks or `stop` is set.
fn writer(
    port: u16,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    seed: u64,
    limit: u64,
    flush_every: u64,
    fua_every: u64,
) {
    let mut client = match NbdClient::connect(port, "v") {
        Ok(client) => client,
        Err(err) => {
            // Refused or reset because the kill came first is fine; else a failure.
            let mut m = model.lock().unwrap();
            if !m.killed {
                m.errors.push(format!("connect: {err}"));
            }
            return;
        }
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut handle = 0u64;
    let mut writes = 0u64;
    // The daemon is stopping (it answered ESHUTDOWN): send nothing more, collect the
    // replies, disconnect.
    let mut draining = false;
    loop {
        while pending.len() < 16 && !draining && !stop.load(Ordering::Relaxed) {
            handle += 1;
            if handle.is_multiple_of(flush_every) {
                let mark = model.lock().unwrap().acks;
                if client.send_flush(handle).is_err() {
                    model.lock().unwrap().unanswered += pending.len() as u64;
                    return;
                }
                pending.insert(handle, Pending::Flush { mark });
                continue;
            }
            let count = *[1u64, 1, 1, 1, 2, 4, 16].get(rng.usize(..7)).unwrap();
            let fua = fua_every != 0 && writes % fua_every == fua_every - 1;
            let picked = {
                let mut m = model.lock().unwrap();
                let mut picked = None;
                for _ in 0..8 {
                    let first = rng.u64(..limit - count);
                    let range = first as usize..(first + count) as usize;
                    if m.slots[range.clone()].iter().all(|s| !s.busy) {
                        let version = m.next_version;
                        m.next_version += 1;
                        for slot in &mut m.slots[range] {
                            slot.busy = true;
                            slot.writes.push(Written {
                                version,
                                acked_at: None,
                                fua,
                            });
                        }
                        picked = Some((first, version));
                        break;
                    }
                }
                picked
            };
            let Some((first, version)) = picked else {
                break;
            };
            writes += 1;
            let mut payload = Vec::with_capacity((count * BLOCK) as usize);
            for slot in first..first + count {
                payload.extend(block_content(slot, version));
            }
            let flags = if fua { command_flags::FUA } else { 0 };
            if client
                .send_write(handle, first * BLOCK, &payload, flags)
                .is_err()
            {
                model.lock().unwrap().unanswered += pending.len() as u64;
                return;
            }
            pending.insert(handle, Pending::Write { first, count });
        }
        if pending.is_empty() {
            if draining {
                client.disconnect();
            }
            return;
        }
        let Ok(reply) = client.reply() else {
            model.lock().unwrap().unanswered += pending.len() as u64;
            return;
        };
        let mut m = model.lock().unwrap();
        let Some(done) = pending.remove(&reply.handle) else {
            m.errors
                .push(format!("a reply for unknown handle {}", reply.handle));
            return;
        };
        if reply.error == Errno::Shutdown.code() {
            // Refused, not written: it stays unacknowledged (either content may be there).
            draining = true;
            m.shutdown_replies += 1;
            continue;
        }
        if reply.error != 0 {
            m.errors.push(format!(
                "request {} failed: error {}",
                reply.handle, reply.error
            ));
            return;
        }
        match done {
            Pending::Write { first, count } => {
                m.acks += 1;
                let tick = m.acks;
                let mut fua = false;
                for slot in &mut m.slots[first as usize..(first + count) as usize] {
                    slot.busy = false;
                    let last = slot.writes.last_mut().expect("the write in flight");
                    last.acked_at = Some(tick);
                    fua = last.fua;
                }
                m.fuas += u64::from(fua);
            }
            Pending::Flush { mark } => {
                m.durable_upto = m.durable_upto.max(mark);
                m.flushes += 1;
            }
        }
    }
}

/// The random seed: `SPOOL_TEST_SEED` to replay a failure (the message prints it), else new.
fn test_seed() -> u64 {
    std::env::var("SPOOL_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

/// Two writers on two connections: one with a FLUSH every 32 requests, one with a FLUSH
/// every 48 and FUA on every fifth write.
fn start_writers(
    port: u16,
    model: &Arc<Mutex<Model>>,
    stop: &Arc<AtomicBool>,
    rng: &mut fastrand::Rng,
    limit: u64,
) -> Vec<std::thread::JoinHandle<()>> {
    [(32u64, 0u64), (48, 5)]
        .into_iter()
        .map(|(flush_every, fua_every)| {
            let model = Arc::clone(model);
            let stop = Arc::clone(stop);
            let seed = rng.u64(..);
            std::thread::spawn(move || {
                writer(port, model, stop, seed, limit, flush_every, fua_every)
            })
        })
        .collect()
}

/// Reads back every block the model knows of and checks it: it must hold the last write
/// that was durable (acknowledged before an acknowledged FLUSH was sent, or with FUA) or a
/// later one; and, as a kill -9 loses nothing the kernel has, the last acknowledged write
/// or a later one. Then what it holds becomes its base. Returns the problems found.
fn verify(port: u16, model: &mut Model, rng: &mut fastrand::Rng) -> Vec<String> {
    let mut client = NbdClient::connect(port, "v").expect("connect to verify");
    let tracked: Vec<u64> = (0..model.slots.len() as u64)
        .filter(|&s| {
            let slot = &model.slots[s as usize];
            slot.base.is_some() || !slot.writes.is_empty()
        })
        .collect();
    // Runs of neighbouring slots, 64 blocks a READ at most, 16 in flight.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in &tracked {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == s && *count < 64 => *count += 1,
            _ => runs.push((s, 1)),
        }
    }
    // And a sample of never-written blocks, which must read zeros.
    let untouched: Vec<u64> = (0..256)
        .map(|_| rng.u64(..model.slots.len() as u64))
        .filter(|&s| {
            let slot = &model.slots[s as usize];
            slot.base.is_none() && slot.writes.is_empty()
        })
        .collect();
    runs.extend(untouched.iter().map(|&s| (s, 1)));
    let mut observed: HashMap<u64, Result<Option<u64>, String>> = HashMap::new();
    let mut next = 0;
    let mut in_flight: HashMap<u64, (u64, u64)> = HashMap::new();
    while next < runs.len() || !in_flight.is_empty() {
        while next < runs.len() && in_flight.len() < 16 {
            let (first, count) = runs[next];
            client
                .send_read(next as u64, first * BLOCK, (count * BLOCK) as u32)
                .expect("send a READ");
            in_flight.insert(next as u64, (first, count));
            next += 1;
        }
        let reply = client.reply().expect("a READ reply");
        let (first, count) = in_flight.remove(&reply.handle).expect("a READ in flight");
        assert_eq!(reply.error, 0, "READ of blocks {first}+{count} failed");
        for i in 0..count {
            let at = (i * BLOCK) as usize;
            let slot = first + i;
            observed.insert(
                slot,
                decode_block(slot, &reply.data[at..at + BLOCK as usize]),
            );
        }
    }
    client.disconnect();
    let mut problems = Vec::new();
    for &s in untouched.iter() {
        if !matches!(observed[&s], Ok(None)) {
            problems.push(format!(
                "block {s}, never written, reads {:?}",
                observed[&s]
            ));
        }
    }
    for s in tracked {
        let slot = &model.slots[s as usize];
        let got = match &observed[&s] {
            Ok(got) => *got,
            Err(why) => {
                problems.push(format!("block {s}: {why}"));
                continue;
            }
        };
        let allowed = |from: Option<usize>| -> Vec<Option<u64>> {
            match from {
                Some(i) => slot.writes[i..].iter().map(|w| Some(w.version)).collect(),
                None => std::iter::once(slot.base)
                    .chain(slot.writes.iter().map(|w| Some(w.version)))
                    .collect(),
            }
        };
        let durable = slot.writes.iter().rposition(|w| model.durable(w));
        let acked = slot.writes.iter().rposition(|w| w.acked_at.is_some());
        if !allowed(durable).contains(&got) {
            let w = slot.writes[durable.unwrap()];
            problems.push(format!(
                "block {s} reads version {got:?}: lost version {} (acknowledged{} and then \
                 covered by an acknowledged FLUSH or FUA); writes since the start: {:?}",
                w.version,
                if w.fua { " with FUA" } else { "" },
                slot.writes
            ));
        } else if !allowed(acked).contains(&got) {
            problems.push(format!(
                "block {s} reads version {got:?}: lost acknowledged version {} (no FLUSH \
                 covered it, but a kill -9 loses nothing the kernel was given); writes: {:?}",
                slot.writes[acked.unwrap()].version,
                slot.writes
            ));
        }
    }
    for (s, slot) in model.slots.iter_mut().enumerate() {
        if let Some(Ok(got)) = observed.get(&(s as u64)) {
            slot.base = *got;
        }
        slot.writes.clear();
        slot.busy = false;
    }
    model.durable_upto = model.acks;
    problems
}

#[test]
fn kill_9_while_writing_keeps_every_flushed_and_fua_write_and_every_cluster_owned_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A thin volume, so first writes to clusters (inserts) race the kill too.
    make_store(d, "128M", &[("v", "96M")]);
    let slots = 96 * MIB / BLOCK;
    let model = Arc::new(Mutex::new(Model::new(slots)));
    let seed = test_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    // Kill after this many acknowledged writes: right at the start, early, later, ...
    let targets = [
        rng.u64(1..20),
        rng.u64(50..300),
        rng.u64(300..1500),
        rng.u64(1000..3000),
        rng.u64(1..3000),
    ];
    let mut report = Vec::new();
    for (round, &target) in targets.iter().enumerate() {
        let serving = Daemon::start(d, IMAGE, &["--cores", "0,1"]);
        if round > 0 {
            let problems = verify(serving.port, &mut model.lock().unwrap(), &mut rng);
            assert!(
                problems.is_empty(),
                "seed {seed}, after kill {round}: {} problem(s):\n{}",
                problems.len(),
                problems[..problems.len().min(10)].join("\n")
            );
            // The first round's acknowledged writes persisted cluster inserts, so the store
            // was dirty when killed; a recovered store stays dirty until a clean unload.
            assert!(serving.recovered(), "round {round}: {:?}", serving.banner);
        }
        let start_acks = model.lock().unwrap().acks;
        let stop = Arc::new(AtomicBool::new(false));
        // Each round writes into a wider part of the volume: some first writes every time.
        let limit = slots * (round as u64 + 1) / targets.len() as u64;
        let writers = start_writers(serving.port, &model, &stop, &mut rng, limit);
        let deadline = Instant::now() + Duration::from_secs(20);
        while model.lock().unwrap().acks < start_acks + target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        {
            let mut m = model.lock().unwrap();
            m.killed = true;
            assert!(
                m.acks > start_acks,
                "round {round}: no write acknowledged in 20 s: {:?}; log:\n{}",
                m.errors,
                serving.log_text()
            );
        }
        serving.kill9();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().expect("a writer thread panicked");
        }
        let mut m = model.lock().unwrap();
        m.killed = false;
        assert!(m.errors.is_empty(), "round {round}: {:?}", m.errors);
        report.push(format!(
            "round {round}: killed after {} acknowledged writes ({} flushes, {} FUA)",
            m.acks - start_acks,
            m.flushes,
            m.fuas
        ));
    }
    // The last restart: recovered, everything checks; then a clean stop and an offline look.
    let serving = Daemon::start(d, IMAGE, &[]);
    let problems = verify(serving.port, &mut model.lock().unwrap(), &mut rng);
    assert!(
        problems.is_empty(),
        "seed {seed}, after the last kill: {} problem(s):\n{}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n")
    );
    assert!(serving.recovered(), "{:?}", serving.banner);
    serving.stop();
    check_clusters_owned_once(d, IMAGE);
    // And after the clean unload every block still reads what it did.
    let serving = Daemon::start(d, IMAGE, &[]);
    assert!(!serving.recovered(), "{:?}", serving.banner);
    let problems = verify(serving.port, &mut model.lock().unwrap(), &mut rng);
    assert!(problems.is_empty(), "after a clean stop: {problems:?}");
    serving.stop();
    eprintln!(
        "kill test (seed {seed}, {:?}):\n{}",
        started.elapsed(),
        report.join("\n")
    );
}

#[test]
fn sigterm_while_writing_answers_every_request_and_stops_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_store(d, "64M", &[("v", "32M")]);
    let slots = 32 * MIB / BLOCK;
    let model = Arc::new(Mutex::new(Model::new(slots)));
    let seed = test_seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let serving = Daemon::start(d, IMAGE, &["--cores", "0,1"]);
    let port = serving.port;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(port, &model, &stop, &mut rng, slots);
    let target = rng.u64(200..1500);
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.lock().unwrap().acks < target && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    // SIGTERM with the writers going: exit 0, store clean (checked by stop).
    model.lock().unwrap().killed = true;
    serving.stop();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("a writer thread panicked");
    }
    {
        let m = model.lock().unwrap();
        assert!(m.errors.is_empty(), "seed {seed}: {:?}", m.errors);
        assert!(m.acks > 0);
        // Every request got its reply: done, or refused with ESHUTDOWN once stopping.
        assert_eq!(m.unanswered, 0, "seed {seed}: requests left unanswered");
    }
    // Every acknowledged write is there after the clean stop.
    let serving = Daemon::start(d, IMAGE, &[]);
    assert!(!serving.recovered(), "{:?}", serving.banner);
    let problems = verify(serving.port, &mut model.lock().unwrap(), &mut rng);
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problem(s):\n{}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n")
    );
    serving.stop();
    check_clusters_owned_once(d, IMAGE);
}

// ---------------------------------------------------------------------------------------
// FLUSH and FUA reach the device

/// A loop device over a file, detached on drop. Its `/sys/block/NAME/stat` counts the
/// flushes the block layer completed (field 16, Linux 5.5 on), which a kill -9 test cannot
/// see: a process that dies loses nothing the kernel has, flushed or not.
struct LoopDevice {
    device: String,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let output = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|err| panic!("losetup: {err} (this test needs root and util-linux)"));
        assert!(
            output.status.success(),
            "losetup --find --show failed (this test needs root and a free loop device): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        LoopDevice {
            device: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        }
    }

    /// Flushes the block layer has completed on the device.
    fn flushes(&self) -> u64 {
        let name = self.device.trim_start_matches("/dev/");
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        let fields: Vec<u64> = stat
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert!(
            fields.len() >= 17,
            "{name}/stat has no flush counts (Linux 5.5 on): {stat}"
        );
        fields[15]
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.device])
            .status();
    }
}

#[test]
fn flush_and_fua_reach_the_device_from_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = std::fs::File::create(d.join("loop.img")).unwrap();
    file.set_len(64 * MIB).unwrap();
    drop(file);
    let device = LoopDevice::attach(&d.join("loop.img"));
    let dev = device.device.as_str();
    spool(d, &["init", dev]);
    // A thick volume: its writes change no metadata, so only FLUSH and FUA flush.
    spool(d, &["create", dev, "--size", "16M", "--name", "v"]);
    let serving = Daemon::start(d, dev, &["--cores", "0,1"]);
    let mut a = NbdClient::connect(serving.port, "v").unwrap();
    let mut b = NbdClient::connect(serving.port, "v").unwrap();
    assert_eq!(a.write(0, &[0xa1; 4096]).unwrap(), 0);
    // A FLUSH on another connection makes a's write durable (multi-conn): a device flush.
    let before = device.flushes();
    b.send_flush(7).unwrap();
    let reply = b.reply().unwrap();
    assert_eq!((reply.handle, reply.error), (7, 0));
    let after = device.flushes();
    assert!(
        after > before,
        "an acknowledged NBD_CMD_FLUSH flushed nothing on the device ({before} -> {after})"
    );
    // A FUA write flushes before its reply.
    let before = device.flushes();
    b.send_write(8, 64 * KIB, &[0xb2; 4096], command_flags::FUA)
        .unwrap();
    let reply = b.reply().unwrap();
    assert_eq!((reply.handle, reply.error), (8, 0));
    let after = device.flushes();
    assert!(
        after > before,
        "an acknowledged FUA write flushed nothing on the device ({before} -> {after})"
    );
    assert_eq!(a.read(64 * KIB, 4096).unwrap(), vec![0xb2; 4096]);
    a.disconnect();
    b.disconnect();
    serving.stop();
}
