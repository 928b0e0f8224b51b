//! Phase 6: the snapshot graph and the lvol layer's names. Parents resolve (a clone's
//! `SNAP` names an existing, read-only blob, with no cycle), no snapshot or merge is left
//! half done (`SNAPTMP`, `SNAPRM`), the super blob exists, and lvol names and uuids are
//! unique within the store.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::chains::BlobRecord;
use super::report::{Problem, ProblemKind};
use crate::format::BLOBID_INVALID;
use crate::lvol::xattr::{NAME_XATTR, UUID_XATTR};
use crate::meta::{XATTR_SNAPSHOT_PENDING, XATTR_SNAPSHOT_REMOVING};

fn marker(record: &BlobRecord, name: &str) -> Option<Result<u64, usize>> {
    let value = record.meta.as_ref()?.xattr(true, name.as_bytes())?;
    Some(
        <[u8; 8]>::try_from(value)
            .map(u64::from_le_bytes)
            .map_err(|_| value.len()),
    )
}

/// The text of an lvol xattr: up to the first NUL.
fn text(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// Checks the graph and the lvol names; `records` sorted by id; `lvs` when the store's
/// bstype is `LVOLSTORE`.
pub fn check_graph(
    records: &[BlobRecord],
    super_blob: u64,
    lvs: bool,
    problems: &mut Vec<Problem>,
) {
    let by_id: HashMap<u64, &BlobRecord> = records
        .iter()
        .filter(|r| !r.root_broken)
        .map(|r| (r.id, r))
        .collect();
    let problem =
        |kind, record: &BlobRecord, field: &str, expected: String, found: String| Problem {
            kind,
            page: Some(record.root()),
            blob: Some(record.id),
            field: field.into(),
            expected,
            found,
        };
    if super_blob != BLOBID_INVALID && !by_id.contains_key(&super_blob) {
        problems.push(Problem {
            kind: ProblemKind::SuperBlobMissing,
            page: None,
            blob: Some(super_blob),
            field: "super.super_blob".into(),
            expected: "a blob of this store, or 0xffffffffffffffff".into(),
            found: format!("{super_blob:#x}, which is not a blob"),
        });
    }
    if lvs {
        check_lvs(&by_id, super_blob, problems);
    }
    let mut parents: HashMap<u64, u64> = HashMap::new();
    for record in records {
        let Some(meta) = &record.meta else {
            continue;
        };
        match meta.parent_id() {
            Err(err) => problems.push(problem(
                ProblemKind::DanglingParent,
                record,
                "SNAP",
                "an 8-byte parent blob id".into(),
                err.to_string(),
            )),
            Ok(None) => {}
            Ok(Some(parent)) => match by_id.get(&parent) {
                None => problems.push(problem(
                    ProblemKind::DanglingParent,
                    record,
                    "SNAP",
                    "the id of a blob of this store".into(),
                    format!("{parent:#x}, which is not a blob"),
                )),
                Some(snapshot) => {
                    parents.insert(record.id, parent);
                    if let Some(snap_meta) = &snapshot.meta {
                        if !snap_meta.data_ro() {
                            problems.push(problem(
                                ProblemKind::ParentNotReadOnly,
                                snapshot,
                                "data_ro_flags",
                                format!("read-only (the parent of {:#x})", record.id),
                                format!("{:#x}", snap_meta.flags.data_ro),
                            ));
                        }
                    }
                }
            },
        }
        for (name, kind, what) in [
            (
                XATTR_SNAPSHOT_PENDING,
                ProblemKind::SnapshotPending,
                "snapshot of",
            ),
            (
                XATTR_SNAPSHOT_REMOVING,
                ProblemKind::MergePending,
                "merge into",
            ),
        ] {
            match marker(record, name) {
                None => {}
                Some(Ok(other)) => problems.push(problem(
                    kind,
                    record,
                    name,
                    "no marker (a crash left this operation half done)".into(),
                    format!("{what} {other:#x} half done"),
                )),
                Some(Err(len)) => problems.push(problem(
                    kind,
                    record,
                    name,
                    "no marker".into(),
                    format!("a {len}-byte marker (not a blob id)"),
                )),
            }
        }
    }
    // Cycles: each blob's parent chain is walked once in all (a blob already known to
    // reach a root, or already reported, stops the walk), so the cost is linear.
    let mut settled: HashSet<u64> = HashSet::new();
    for record in records {
        let mut path = Vec::new();
        let mut on_path = HashSet::new();
        let mut at = record.id;
        loop {
            if settled.contains(&at) {
                break;
            }
            if !on_path.insert(at) {
                // `at` is on a cycle: report it once, at the blob where the walk met it.
                if let Some(blob) = by_id.get(&at) {
                    problems.push(problem(
                        ProblemKind::ParentCycle,
                        blob,
                        "SNAP",
                        "a parent chain ending at a blob with no parent".into(),
                        format!("a chain coming back to {at:#x}"),
                    ));
                }
                break;
            }
            path.push(at);
            match parents.get(&at) {
                Some(&parent) => at = parent,
                None => break,
            }
        }
        settled.extend(path);
    }
    // Lvol names and uuids (the super blob's are the store's own).
    for (xattr, kind) in [
        (NAME_XATTR, ProblemKind::LvolNameDuplicate),
        (UUID_XATTR, ProblemKind::LvolUuidDuplicate),
    ] {
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for record in records {
            if record.id == super_blob {
                continue;
            }
            // A damaged lvol's name and uuid, read from its intact pages, stay taken.
            let value = match &record.meta {
                Some(meta) => meta.xattr(false, xattr.as_bytes()),
                None => record
                    .readable_xattrs
                    .iter()
                    .find(|(name, _)| name == xattr.as_bytes())
                    .map(|(_, value)| &value[..]),
            };
            let Some(value) = value else {
                continue;
            };
            let mut value = text(value);
            if xattr == UUID_XATTR {
                // A uuid is a 128-bit value: its hex digits in either case name the same one.
                value.make_ascii_lowercase();
            }
            if let Some(&first) = seen.get(&value) {
                problems.push(problem(
                    kind,
                    record,
                    xattr,
                    "a value no other lvol of the store has".into(),
                    format!("{value:?}, also the {xattr} of blob {first:#x}"),
                ));
            } else {
                seen.insert(value, record.id);
            }
        }
    }
}

/// An lvol store keeps its `name` and `uuid` in the super blob (SPDK's lvol layer refuses a
/// store without them).
fn check_lvs(by_id: &HashMap<u64, &BlobRecord>, super_blob: u64, problems: &mut Vec<Problem>) {
    let Some(record) = by_id.get(&super_blob) else {
        if super_blob == BLOBID_INVALID {
            problems.push(Problem {
                kind: ProblemKind::LvsMetadata,
                page: None,
                blob: None,
                field: "super.super_blob".into(),
                expected: "the lvol store's super blob (bstype LVOLSTORE)".into(),
                found: "no super blob".into(),
            });
        }
        return;
    };
    let Some(meta) = &record.meta else {
        return;
    };
    for xattr in [NAME_XATTR, UUID_XATTR] {
        let value = meta.xattr(false, xattr.as_bytes()).map(text);
        if value.as_deref().is_none_or(str::is_empty) {
            problems.push(Problem {
                kind: ProblemKind::LvsMetadata,
                page: Some(record.root()),
                blob: Some(record.id),
                field: xattr.into(),
                expected: format!("the lvol store's {xattr}"),
                found: value.map_or("no such xattr".into(), |v| format!("{v:?}")),
            });
        }
    }
}
