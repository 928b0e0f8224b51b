//! The text form of `spool dump`: the super block, the masks, then one paragraph per md page.

use std::fmt::Write as _;

use crate::blob_cmd::dump::{DescriptorDump, DumpReport, MaskDump, PageDump};
use crate::blob_cmd::text::{escape, id_hex, table};

/// `first-last` or `first` for a one-element run.
fn span(first: u64, last: u64) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// Blob clusters from `start` mapped to `clusters` (0 = unallocated), as runs:
/// `0-3 -> 1-4, 4-9 unallocated`.
fn mapping(start: u64, clusters: &[u32]) -> String {
    let mut runs: Vec<(u64, u64, u32)> = Vec::new(); // (blob first, count, device first)
    for (at, &device) in clusters.iter().enumerate() {
        let blob = start + at as u64;
        if let Some(last) = runs.last_mut() {
            let contiguous = if last.2 == 0 {
                device == 0
            } else {
                device != 0 && u64::from(device) == u64::from(last.2) + last.1
            };
            if contiguous {
                last.1 += 1;
                continue;
            }
        }
        runs.push((blob, 1, device));
    }
    if runs.is_empty() {
        return "none".into();
    }
    runs.iter()
        .map(|&(blob, count, device)| {
            let blobs = span(blob, blob + count - 1);
            if device == 0 {
                format!("{blobs} unallocated")
            } else {
                let device = u64::from(device);
                format!("{blobs} -> {}", span(device, device + count - 1))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn descriptor_line(descriptor: &DescriptorDump) -> String {
    match descriptor {
        DescriptorDump::Flags {
            invalid,
            data_ro,
            md_ro,
            decoded,
        } => format!(
            "flags: invalid {invalid:#x}, data_ro {data_ro:#x}, md_ro {md_ro:#x} ({})",
            decoded.join(", ")
        ),
        DescriptorDump::Xattr {
            internal,
            name,
            text,
            ..
        } => format!(
            "{} {} = {text}",
            if *internal { "internal xattr" } else { "xattr" },
            escape(name.as_bytes())
        ),
        DescriptorDump::ExtentRle { runs } => {
            // Rendered run by run (never expanded: a corrupt count can be 2^32).
            let mut position = 0u64;
            let mut parts = Vec::new();
            for &[cluster, count] in runs {
                let count = u64::from(count);
                if count == 0 {
                    parts.push(format!("empty run of cluster {cluster}"));
                    continue;
                }
                let blobs = span(position, position + count - 1);
                parts.push(if cluster == 0 {
                    format!("{blobs} unallocated")
                } else {
                    let first = u64::from(cluster);
                    format!("{blobs} -> {}", span(first, first + count - 1))
                });
                position += count;
            }
            format!("extent rle: {}", parts.join(", "))
        }
        DescriptorDump::ExtentTable {
            num_clusters,
            entries,
        } => {
            let pages: Vec<String> = entries
                .iter()
                .map(|&[page, count]| match (page, count) {
                    (0, count) => format!("none x{count}"),
                    (page, 1) => page.to_string(),
                    (page, count) => format!("{page} x{count}"),
                })
                .collect();
            format!(
                "extent table: {num_clusters} clusters; extent pages: {}",
                if pages.is_empty() {
                    "none".to_string()
                } else {
                    pages.join(", ")
                }
            )
        }
        DescriptorDump::ExtentPage {
            start_cluster,
            clusters,
        } => format!(
            "extent page: {}",
            mapping(u64::from(*start_cluster), clusters)
        ),
        DescriptorDump::Unknown { kind, length } => {
            format!("unknown descriptor type {kind}, {length} bytes")
        }
        DescriptorDump::Error { message } => format!("bad descriptor: {message}"),
    }
}

fn page_paragraph(out: &mut String, page: &PageDump) {
    let mut notes = String::new();
    if page.in_md_mask == Some(false) {
        notes.push_str(" [not in the md page mask]");
    }
    if page.role == "root" && page.in_blobid_mask == Some(false) {
        notes.push_str(" [not in the blob id mask]");
    }
    let _ = writeln!(
        out,
        "md page {}: blob {}, {}, sequence {}, next {}, crc {} {}{notes}",
        page.index,
        id_hex(page.id),
        page.role,
        page.sequence,
        page.next
            .map_or_else(|| "none".into(), |next| next.to_string()),
        page.crc,
        if page.crc_ok { "ok" } else { "MISMATCH" },
    );
    for descriptor in &page.descriptors {
        let _ = writeln!(out, "  {}", descriptor_line(descriptor));
    }
}

fn mask_line(mask: &MaskDump) -> Vec<String> {
    let summary = match (&mask.set_ranges, mask.set_count, &mask.error) {
        (Some(ranges), Some(count), _) => {
            let list: Vec<String> = ranges.iter().map(|&[a, b]| span(a, b)).collect();
            format!(
                "{} bits, {count} set: {}",
                mask.bits,
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(",")
                }
            )
        }
        (_, _, Some(err)) => format!("error: {err}"),
        _ => "?".into(),
    };
    vec![
        mask.mask.to_string(),
        format!("page {} (+{})", mask.start, mask.pages),
        summary,
    ]
}

/// The whole dump as text.
pub fn text(report: &DumpReport) -> String {
    let block = &report.super_block;
    let mut out = String::new();
    let _ = writeln!(out, "image {}: {} bytes", report.image, report.image_bytes);
    let _ = writeln!(
        out,
        "super block: crc {} {}",
        block.crc,
        if block.crc_ok { "ok" } else { "MISMATCH" }
    );
    let region = |start: u32, len: u32| format!("page {start} (+{len})");
    let rows: Vec<Vec<String>> = [
        ("signature", escape(block.signature.as_bytes())),
        ("version", block.version.to_string()),
        ("length", block.length.to_string()),
        ("clean", block.clean.to_string()),
        (
            "super_blob",
            block.super_blob.map_or_else(|| "none".into(), id_hex),
        ),
        ("cluster_size", block.cluster_size.to_string()),
        ("io_unit_size", block.io_unit_size.to_string()),
        ("size", block.size.to_string()),
        (
            "bstype",
            if block.bstype.is_empty() {
                "(none)".into()
            } else {
                escape(block.bstype.as_bytes())
            },
        ),
        (
            "used_page_mask",
            region(block.used_page_mask_start, block.used_page_mask_len),
        ),
        (
            "used_cluster_mask",
            region(block.used_cluster_mask_start, block.used_cluster_mask_len),
        ),
        (
            "used_blobid_mask",
            region(block.used_blobid_mask_start, block.used_blobid_mask_len),
        ),
        ("md_start", block.md_start.to_string()),
        ("md_len", block.md_len.to_string()),
        (
            "total_clusters",
            format!(
                "{} ({} for metadata)",
                block.total_clusters, block.md_clusters
            ),
        ),
    ]
    .into_iter()
    .map(|(key, value)| vec![format!("  {key}"), value])
    .collect();
    out.push_str(&table(&rows));
    out.push_str("masks:\n");
    let rows: Vec<Vec<String>> = report
        .masks
        .iter()
        .map(|mask| {
            let mut row = mask_line(mask);
            row[0] = format!("  {}", row[0]);
            row
        })
        .collect();
    out.push_str(&table(&rows));
    for page in &report.pages {
        page_paragraph(&mut out, page);
    }
    let mismatches = report.pages.iter().filter(|page| !page.crc_ok).count();
    let _ = writeln!(
        out,
        "{} md page(s) with a non-zero id, {mismatches} CRC mismatch(es)",
        report.pages.len()
    );
    if report.problems.is_empty() {
        out.push_str("problems: none\n");
    } else {
        let _ = writeln!(out, "problems: {}", report.problems.len());
        for problem in &report.problems {
            let _ = writeln!(out, "  {problem}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_maps_render_as_runs() {
        assert_eq!(mapping(0, &[1, 2, 3, 4]), "0-3 -> 1-4");
        assert_eq!(
            mapping(512, &[7, 0, 0, 9]),
            "512 -> 7, 513-514 unallocated, 515 -> 9"
        );
        assert_eq!(mapping(0, &[]), "none");
        assert_eq!(span(3, 3), "3");
    }

    #[test]
    fn rle_runs_keep_blob_positions() {
        let line = descriptor_line(&DescriptorDump::ExtentRle {
            runs: vec![[5, 2], [0, 3], [9, 1]],
        });
        assert_eq!(line, "extent rle: 0-1 -> 5-6, 2-4 unallocated, 5 -> 9");
    }
}
