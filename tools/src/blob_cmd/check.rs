//! `spool check IMAGE [--repair] [--json] [--output NEW]`: the arguments, the locks and the
//! printing. The checker and the repair are [`spool_blob::check`]; half-done snapshots and
//! merges are finished by the store's own load, run here after the repair.
//!
//! Exit codes: 0 consistent, 2 problems found (after a repair: problems left), 1 the check
//! could not run (unreadable device, not a blobstore, image locked by another process).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::{json, Value};
use spool_blob::check::image::ImageIo;
use spool_blob::check::repair::{repair_image, RepairReport};
use spool_blob::check::{check_image, CheckError, CheckReport, Checked};
use spool_blob::LoadOptions;
use spool_engine::offline::check_image_exists;
use spool_engine::{ImageLock, StoreOpen};

use crate::blob_cmd::args::CheckArgs;
use crate::blob_cmd::store_cmds::to_json;
use crate::blob_cmd::text::emit;
use crate::blob_cmd::with_locked_store;
use crate::error::ToolError;

/// Runs `spool check`.
pub fn check(args: &CheckArgs) -> Result<(), ToolError> {
    if args.repair {
        repair(args)
    } else {
        check_only(args)
    }
}

fn failed(image: &str, err: impl std::fmt::Display) -> ToolError {
    let message = spool_engine::words::scrub(&err.to_string());
    if message.contains(image) {
        ToolError::Failed(message)
    } else {
        ToolError::Failed(format!("{image}: {message}"))
    }
}

/// The image as the checker reads it, with a stop signal (Ctrl-C, SIGTERM, SIGHUP) asking
/// the md region scan to stop between two batches: on a block device (no holes to skip) the
/// scan reads the whole region, 4 GiB for 1 TiB of 1 MiB clusters.
struct Stoppable<'f>(&'f File);

impl ImageIo for Stoppable<'_> {
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        ImageIo::read_at(self.0, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        ImageIo::write_at(self.0, buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn next_data(&self, offset: u64) -> Option<u64> {
        self.0.next_data(offset)
    }
    fn stop_requested(&self) -> bool {
        spool_engine::signals::stop_requested().is_some()
    }
}

/// Runs the checker, printing its phases on stderr (not with --json). Before anything was
/// written (`stoppable`), a stop signal ends the scan: exit 130 (143, 129), the image only
/// read.
fn run_check(image: &str, file: &File, json: bool, stoppable: bool) -> Result<Checked, ToolError> {
    let mut progress = |line: String| {
        if !json {
            eprintln!("check: {line}");
        }
    };
    let stopping = Stoppable(file);
    let io: &dyn ImageIo = if stoppable { &stopping } else { file };
    check_image(io, &mut progress).map_err(|err: CheckError| match err {
        CheckError::NotABlobstore(why) => crate::blob_cmd::not_a_store(image, &why),
        CheckError::Stopped { scanned, md_len } => ToolError::Interrupted {
            signal: spool_engine::signals::stop_requested()
                .unwrap_or(spool_engine::signals::StopSignal::Interrupt),
            done: format!(
                "{scanned} of {md_len} md pages of {image} scanned (the check is not finished; nothing was written)"
            ),
            report: None,
        },
        other => failed(image, other),
    })
}

fn verdict(report: &CheckReport) -> Result<(), ToolError> {
    if report.is_clean() {
        Ok(())
    } else {
        Err(ToolError::Inconsistent(report.problems.len()))
    }
}

fn check_only(args: &CheckArgs) -> Result<(), ToolError> {
    let path = Path::new(&args.image);
    check_image_exists(path).map_err(|err| failed(&args.image, err))?;
    refuse_a_non_store(&args.image)?;
    let _lock = ImageLock::shared(path).map_err(|err| failed(&args.image, err))?;
    let file = File::open(path).map_err(|err| io_failed(&args.image, "open", &err))?;
    let checked = run_check(&args.image, &file, args.json, true)?;
    if args.json {
        emit(&format!(
            "{}\n",
            to_json(&report_json(&args.image, &checked.report))?
        ))?;
    } else {
        emit(&report_text(&args.image, &checked.report))?;
    }
    verdict(&checked.report)
}

/// Refuses, before any phase is printed, an image with no blobstore signature at all (as
/// every command says it); a store damaged past its signature is the checker's to report.
fn refuse_a_non_store(image: &str) -> Result<(), ToolError> {
    // An image that cannot be read is reported by what opens it next, in its own words.
    if File::open(image).is_err() || spool_engine::guard::holds_blobstore(Path::new(image)) {
        return Ok(());
    }
    Err(crate::blob_cmd::not_a_store(image, "no SPDKBLOB signature"))
}

/// An io error on `image` while doing `what`, in words.
fn io_failed(image: &str, what: &str, err: &std::io::Error) -> ToolError {
    ToolError::Failed(format!(
        "{image}: {}",
        spool_engine::words::failure(what, err)
    ))
}

/// `image` could not be opened for writing, in words (as every writer says it).
fn unwritable(image: &str, err: &std::io::Error) -> ToolError {
    ToolError::Failed(format!(
        "{image}: cannot be opened for writing: {}; check --repair writes the image (check without --repair, or --repair --output NEW, only read it)",
        spool_engine::words::io_words(err)
    ))
}

/// Copies `from` to the new file `to` (refused if it exists), writing only its non-zero
/// 1 MiB pieces (the copy is sparse); returns the copy locked exclusively. The copy is made
/// under a temporary name and appears at `to` only once whole: a stop signal (or a failure)
/// on the way removes it, and `to` never exists half-written.
fn copy_sparse(from: &str, to: &str) -> Result<ImageLock, ToolError> {
    const PIECE: usize = 1 << 20;
    let source = File::open(from).map_err(|err| io_failed(from, "open", &err))?;
    let size = {
        use std::io::{Seek, SeekFrom};
        let mut handle = &source;
        handle
            .seek(SeekFrom::End(0))
            .map_err(|err| io_failed(from, "size", &err))?
    };
    let staged = ImageLock::stage_sparse(Path::new(to), size).map_err(|err| failed(to, err))?;
    let target = OpenOptions::new()
        .write(true)
        .open(staged.temp_path())
        .map_err(|err| io_failed(to, "open", &err))?;
    let mut buf = vec![0u8; PIECE];
    let mut offset = 0u64;
    while offset < size {
        if let Some(signal) = spool_engine::signals::stop_requested() {
            // Dropping `staged` removes the partial copy; the source was only read.
            return Err(ToolError::Interrupted {
                signal,
                done: format!(
                    "copying {offset} of {size} bytes of {from} to {to}; {to} was not created and {from} is untouched"
                ),
                report: None,
            });
        }
        let len = usize::try_from((size - offset).min(PIECE as u64)).unwrap_or(PIECE);
        source
            .read_exact_at(&mut buf[..len], offset)
            .map_err(|err| io_failed(from, &format!("read at byte {offset}"), &err))?;
        if buf[..len].iter().any(|&b| b != 0) {
            target
                .write_all_at(&buf[..len], offset)
                .map_err(|err| io_failed(to, &format!("write at byte {offset}"), &err))?;
        }
        offset += len as u64;
    }
    target
        .sync_all()
        .map_err(|err| io_failed(to, "sync", &err))?;
    drop(target);
    staged.publish().map_err(|err| failed(to, err))
}

fn repair(args: &CheckArgs) -> Result<(), ToolError> {
    let source = Path::new(&args.image);
    check_image_exists(source).map_err(|err| failed(&args.image, err))?;
    refuse_a_non_store(&args.image)?;
    let (target, lock) = match &args.output {
        Some(new) => {
            // The source is read under a shared lock: refused while a writer has it.
            let _source_lock = ImageLock::shared(source).map_err(|err| failed(&args.image, err))?;
            spool_engine::guard::refuse_new_file_in_dev(Path::new(new))
                .map_err(|err| ToolError::Failed(err.to_string()))?;
            if std::fs::symlink_metadata(new).is_ok() {
                return Err(ToolError::Failed(format!(
                    "{new}: exists already: --output names a new file for the repaired copy (to repair {} in place, leave --output out)",
                    args.image
                )));
            }
            if !args.json {
                eprintln!("check: copying {} to {new} (sparse)", args.image);
            }
            (new.clone(), copy_sparse(&args.image, new)?)
        }
        None => (
            args.image.clone(),
            ImageLock::exclusive(source).map_err(|err| failed(&args.image, err))?,
        ),
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .map_err(|err| unwritable(&target, &err))?;
    // A repair refused (the check could not run, or the repair would have to guess) leaves
    // no copy behind under the repaired copy's name.
    let refused = |err: ToolError| {
        if args.output.is_some() {
            let _ = std::fs::remove_file(&target);
        }
        err
    };
    let before = run_check(&target, &file, args.json, true).map_err(refused)?;
    if !args.json {
        emit(&format!(
            "before repair:\n{}",
            report_text(&target, &before.report)
        ))?;
    }
    let nothing_to_do = before.report.is_clean() && before.report.clean == 1;
    let repaired = if nothing_to_do {
        RepairReport::default()
    } else {
        repair_image(&file, &before)
            .map_err(|err| failed(&target, err))
            .map_err(refused)?
    };
    drop(file);
    let mut load_lines = Vec::new();
    if repaired.left_dirty {
        // A load would replay the metadata and free the clusters the repair could not
        // attribute: left for the operator to decide.
        load_lines.push("no load run: the store is left dirty (see \"not repaired\")".into());
    } else if !nothing_to_do {
        // The store's own load finishes or rolls back half-done snapshots and merges, and
        // its unload leaves the store clean.
        let loaded = with_locked_store(
            &target,
            Path::new(&target),
            &lock,
            StoreOpen::Load(LoadOptions::default()),
            |_store, info| async move { Ok(info.load_report) },
        );
        match loaded {
            Ok(Some(report)) => {
                load_lines.extend(report.repaired.iter().map(|line| format!("load: {line}")));
                load_lines.extend(
                    report
                        .unreadable
                        .iter()
                        .map(|(id, why)| format!("load: blob {id:#x} stays unreadable: {why}")),
                );
            }
            Ok(None) => {}
            Err(err) => load_lines.push(format!("load after the repair failed: {err}")),
        }
    }
    if !args.json {
        let mut text = String::new();
        if nothing_to_do {
            text.push_str("repair: nothing to change\n");
        }
        for line in repaired.changes.iter() {
            text.push_str(&format!("repair: {line}\n"));
        }
        for line in &load_lines {
            text.push_str(&format!("repair: {line}\n"));
        }
        for line in &repaired.not_repaired {
            text.push_str(&format!("not repaired: {line}\n"));
        }
        emit(&text)?;
    }
    let file = File::open(&target).map_err(|err| io_failed(&target, "open", &err))?;
    let after = run_check(&target, &file, args.json, false)?;
    drop(lock);
    if args.json {
        let value = json!({
            "image": target,
            "before": report_json(&target, &before.report),
            "changes": repaired.changes,
            "load": load_lines,
            "not_repaired": repaired.not_repaired,
            "after": report_json(&target, &after.report),
        });
        emit(&format!("{}\n", to_json(&value)?))?;
    } else {
        emit(&format!(
            "after repair:\n{}",
            report_text(&target, &after.report)
        ))?;
    }
    verdict(&after.report)
}

/// The text report: a summary, each problem on its own line, the verdict.
fn report_text(image: &str, report: &CheckReport) -> String {
    let mut out = String::new();
    let damaged = report.blobs.iter().filter(|b| b.damaged.is_some()).count();
    out.push_str(&format!(
        "{image}: {} clusters ({} metadata), {} md pages, {}\n",
        report.total_clusters,
        report.md_clusters,
        report.md_len,
        if report.clean == 1 { "clean" } else { "dirty" }
    ));
    out.push_str(&format!(
        "blobs: {} ({damaged} damaged); clusters in use: {}; md pages in use: {}\n",
        report.blobs.len(),
        report.used_clusters,
        report.used_md_pages
    ));
    for blob in report.blobs.iter().filter(|b| b.damaged.is_some()) {
        out.push_str(&format!(
            "damaged: blob {:#x}: {}\n",
            blob.id,
            blob.damaged.as_deref().unwrap_or_default()
        ));
    }
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    for problem in &report.problems {
        out.push_str(&format!("problem: {problem}\n"));
    }
    if report.is_clean() {
        out.push_str("consistent\n");
    } else {
        out.push_str(&format!("{} problem(s) found\n", report.problems.len()));
    }
    out
}

/// The JSON report.
fn report_json(image: &str, report: &CheckReport) -> Value {
    json!({
        "image": image,
        "consistent": report.is_clean(),
        "device_bytes": report.device_bytes,
        "clean": report.clean,
        "total_clusters": report.total_clusters,
        "md_clusters": report.md_clusters,
        "md_len": report.md_len,
        "used_clusters": report.used_clusters,
        "used_md_pages": report.used_md_pages,
        "blobs": report.blobs.iter().map(|b| json!({
            "id": b.id,
            "id_hex": format!("{:#x}", b.id),
            "clusters": b.clusters,
            "allocated": b.allocated,
            "md_pages": b.md_pages,
            "parent": b.parent,
            "read_only": b.read_only,
            "damaged": b.damaged,
        })).collect::<Vec<_>>(),
        "problems": report.problems.iter().map(|p| json!({
            "kind": p.kind.name(),
            "page": p.page,
            "blob": p.blob,
            "blob_hex": p.blob.map(|b| format!("{b:#x}")),
            "field": p.field,
            "expected": p.expected,
            "found": p.found,
        })).collect::<Vec<_>>(),
        "notes": report.notes,
    })
}
