//! Goal: the SPDK fixture images and their manifests agree with each other, and the test-support
//! loader (`support::fixtures`) reads them right, before any blobstore code is pointed at them.
//! Method: for every fixture, gunzip the image and check its size and sha256; rebuild every
//! blob's logical content from `content_by_cluster` and check its sha256 and, where a device
//! cluster backs a blob cluster, the raw image bytes there; check the masks, ids, flags and
//! xattrs for internal consistency, and the dirty image's recovery record. Uses only the support
//! module, not the blobstore.

mod support;

use support::fixtures::{self, Manifest, Pattern};

/// The fixtures that the README describes; each must be present.
const KNOWN: [&str; 4] = [
    "p1-blobcli-basic",
    "p2-lvs-thin-snap",
    "p3-dirty",
    "p4-many-xattrs",
];

#[test]
fn every_known_fixture_is_found() {
    let names = fixtures::fixture_names();
    for known in KNOWN {
        assert!(
            names.iter().any(|n| n == known),
            "fixture {known} missing from {} (found {names:?})",
            fixtures::fixtures_dir().display()
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "fixture_names() is sorted");
}

/// Everything about one fixture that needs its image.
fn check_image_and_contents(name: &str) {
    let manifest = fixtures::load_manifest(name);
    assert_eq!(manifest.name, name);
    assert_eq!(manifest.image, format!("{name}.img.gz"));

    let image = fixtures::gunzip_image(name);
    assert_eq!(
        image.len() as u64,
        manifest.image_bytes,
        "{name}: image size"
    );
    assert_eq!(
        fixtures::sha256_hex(&image),
        manifest.image_sha256,
        "{name}: image sha256"
    );
    assert_eq!(
        manifest.super_block.size, manifest.image_bytes,
        "{name}: super block size = image size"
    );
    assert_eq!(&image[..8], b"SPDKBLOB", "{name}: super block signature");

    let cs = manifest.cluster_size() as usize;
    for blob in &manifest.blobs {
        let what = format!("{name} blob {:#x}", blob.id);
        let content = fixtures::expected_content(&manifest, blob);
        assert_eq!(
            content.len() as u64,
            blob.size_bytes,
            "{what}: content size"
        );
        assert_eq!(
            fixtures::sha256_hex(&content),
            blob.sha256,
            "{what}: sha256 of the content rebuilt from content_by_cluster"
        );

        for cluster in &blob.content_by_cluster {
            let c = cluster.cluster as usize;
            assert_eq!(
                fixtures::describe_segments(&cluster.segments),
                cluster.content,
                "{what} cluster {c}: summary matches segments"
            );
            assert_eq!(
                cluster.allocated,
                cluster.device_cluster.is_some(),
                "{what} cluster {c}: allocated iff a device cluster is named"
            );
            assert_eq!(
                cluster.device_cluster,
                blob.device_cluster(cluster.cluster),
                "{what} cluster {c}: device_cluster agrees with allocated_clusters"
            );
            if let Some(device) = cluster.device_cluster {
                let device = device as usize;
                assert!(
                    (device + 1) * cs <= image.len(),
                    "{what} cluster {c}: device cluster {device} past the image end"
                );
                let on_disk = &image[device * cs..(device + 1) * cs];
                let expected = &content[c * cs..(c + 1) * cs];
                if on_disk != expected {
                    let first = on_disk.iter().zip(expected).position(|(a, b)| a != b);
                    panic!(
                        "{what} cluster {c}: device cluster {device} differs from the rebuilt \
                         content (first difference at byte {first:?} of the cluster)"
                    );
                }
            }
        }
    }
}

#[test]
fn images_and_blob_contents_match_manifests() {
    let names = fixtures::fixture_names();
    assert!(!names.is_empty(), "no fixtures found");
    for name in &names {
        check_image_and_contents(name);
    }
}

/// Checks of one manifest that need no image: ids, flags, masks, xattrs, recovery.
fn check_manifest_structure(m: &Manifest) {
    let name = &m.name;
    let sb = &m.super_block;
    assert_eq!(sb.signature, "SPDKBLOB", "{name}");
    assert_eq!(sb.length as u64, fixtures::PAGE_SIZE, "{name}");
    assert_eq!(sb.total_clusters, sb.size / sb.cluster_size, "{name}");
    assert_eq!(
        sb.md_clusters,
        ((sb.md_start + sb.md_len) * fixtures::PAGE_SIZE).div_ceil(sb.cluster_size),
        "{name}: metadata clusters"
    );
    assert_eq!(
        sb.super_blob.unwrap_or(u64::MAX),
        sb.super_blob_raw,
        "{name}: super_blob vs super_blob_hex"
    );
    let trimmed: Vec<u8> = sb
        .bstype_raw
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .collect();
    assert_eq!(
        trimmed,
        sb.bstype.as_bytes(),
        "{name}: bstype text vs bytes"
    );
    assert!(
        m.crosscheck_problems.is_empty(),
        "{name}: crosscheck_problems"
    );

    for blob in &m.blobs {
        let what = format!("{name} blob {:#x}", blob.id);
        assert_eq!(
            blob.id,
            fixtures::BLOBID_HIGH_BIT | blob.md_page,
            "{what}: id encodes its md page"
        );
        assert_eq!(
            blob.md_chain[0].md_page, blob.md_page,
            "{what}: chain start"
        );
        for (i, page) in blob.md_chain.iter().enumerate() {
            assert_eq!(page.sequence as usize, i, "{what}: chain sequence");
            let next = blob.md_chain.get(i + 1).map(|p| p.md_page as u32);
            assert_eq!(page.next, next, "{what}: chain link");
        }
        assert_eq!(
            blob.size_bytes,
            blob.num_clusters * sb.cluster_size,
            "{what}"
        );
        assert_eq!(
            blob.num_allocated_clusters,
            blob.allocated_clusters.len() as u64,
            "{what}"
        );
        assert_eq!(
            blob.thin_provisioned,
            blob.flags.invalid & fixtures::INVALID_FLAG_THIN_PROV != 0,
            "{what}: thin flag"
        );
        assert_eq!(
            blob.read_only,
            blob.flags.data_ro & fixtures::DATA_RO_FLAG_READ_ONLY != 0,
            "{what}: read-only flag"
        );
        assert!(
            blob.flags.invalid & fixtures::INVALID_FLAG_EXTENT_TABLE != 0,
            "{what}: every fixture blob uses an extent table"
        );
        assert!(blob.extent_rle.is_none(), "{what}");
        assert_eq!(blob.extent_table.num_clusters, blob.num_clusters, "{what}");
        assert_eq!(
            blob.flags.invalid & fixtures::INVALID_FLAG_INTERNAL_XATTR != 0,
            !blob.internal_xattrs.is_empty(),
            "{what}: INTERNAL_XATTR iff internal xattrs"
        );
        let snap = blob
            .internal_xattrs
            .get("SNAP")
            .map(|v| u64::from_le_bytes(v.as_slice().try_into().expect("SNAP is 8 bytes")));
        assert_eq!(snap, blob.parent_snapshot_id, "{what}: SNAP = parent id");
        if let Some(parent) = blob.parent_snapshot_id {
            let parent = m.blob(parent).expect("parent snapshot is listed");
            assert!(parent.clones.contains(&blob.id), "{what}: parent lists it");
        }
        for clone in &blob.clones {
            let clone = m.blob(*clone).expect("clone is listed");
            assert_eq!(
                clone.parent_snapshot_id,
                Some(blob.id),
                "{what}: clone parent"
            );
        }
        for page in &blob.extent_pages {
            assert_eq!(
                page.page_id_field_equals_owner,
                page.page_id_field == blob.id,
                "{what}: extent page {}",
                page.md_page
            );
        }
    }

    let masks = &m.masks_on_disk;
    assert_eq!(masks.used_clusters.length_bits, sb.total_clusters, "{name}");
    assert_eq!(masks.used_md_pages.length_bits, sb.md_len, "{name}");
    assert_eq!(masks.used_blobids.length_bits, sb.md_len, "{name}");
    let used_md = fixtures::expected_used_md_pages(m);
    let used_ids = fixtures::expected_used_blobids(m);
    let used_clusters = fixtures::expected_used_clusters(m);
    assert_eq!(
        m.md_pages_in_use
            .iter()
            .map(|p| p.index)
            .collect::<Vec<_>>(),
        used_md,
        "{name}: md_pages_in_use"
    );
    assert_eq!(
        sb.free_clusters,
        sb.total_clusters - used_clusters.len() as u64,
        "{name}: free = total - md - allocated"
    );

    match &m.recovery {
        None => {
            assert!(
                m.is_clean(),
                "{name}: only the dirty image has a recovery record"
            );
            assert_eq!(masks.used_md_pages.set_bits, used_md, "{name}: md mask");
            assert_eq!(masks.used_blobids.set_bits, used_ids, "{name}: blobid mask");
            assert_eq!(
                masks.used_clusters.set_bits, used_clusters,
                "{name}: cluster mask"
            );
        }
        Some(r) => {
            assert!(
                !m.is_clean(),
                "{name}: a recovery record means a dirty image"
            );
            assert_eq!(r.exit_code, 0, "{name}");
            assert_eq!(r.super_after_recovery.clean, 1, "{name}");
            assert_eq!(r.masks_after_recovery.used_md_pages, used_md, "{name}");
            assert_eq!(r.masks_after_recovery.used_blobids, used_ids, "{name}");
            assert_eq!(
                r.masks_after_recovery.used_clusters, used_clusters,
                "{name}"
            );
            assert_eq!(r.md_pages_in_dump_after_recovery, used_md, "{name}");
            assert_eq!(r.free_clusters(), sb.free_clusters, "{name}");
            assert_eq!(
                r.blobs_listed_after_recovery,
                m.blobs.iter().map(|b| b.id).collect::<Vec<_>>(),
                "{name}"
            );
            // The on-disk cluster mask is stale: it misses the last session's clusters.
            let stale = &masks.used_clusters.set_bits;
            assert!(
                stale.len() < used_clusters.len()
                    && stale.iter().all(|c| used_clusters.contains(c)),
                "{name}: on-disk cluster mask {stale:?} is a strict subset of {used_clusters:?}"
            );
        }
    }
}

#[test]
fn manifests_are_internally_consistent() {
    for name in fixtures::fixture_names() {
        check_manifest_structure(&fixtures::load_manifest(&name));
    }
}

#[test]
fn typed_fields_parse_as_documented() {
    let p1 = fixtures::load_manifest("p1-blobcli-basic");
    assert_eq!(p1.super_block.super_blob, Some(0x1_0000_0000));
    assert_eq!(p1.super_block.bstype_raw, [0u8; 16]);
    assert_eq!(p1.super_block.crc, 0x42d6_c20d);
    let a = p1.blob(0x1_0000_0000).expect("blob A");
    assert_eq!(a.xattr("name"), Some(&b"hello\0"[..]));
    assert_eq!(a.flags.invalid, fixtures::INVALID_FLAG_EXTENT_TABLE);
    assert_eq!(
        a.content_by_cluster[0].segments[0].content,
        Pattern::Fill(0xAB)
    );
    let b = p1.blob(0x1_0000_0004).expect("blob B");
    assert_eq!(b.allocated_clusters, vec![(0, 7), (1, 8), (2, 9)]);
    assert_eq!(b.content_by_cluster[2].segments[0].content, Pattern::P(7));
    assert!(p1.blob(0x1_0000_0002).is_none(), "deleted blob C");

    let p2 = fixtures::load_manifest("p2-lvs-thin-snap");
    assert_eq!(p2.super_block.bstype, "LVOLSTORE");
    assert_eq!(&p2.super_block.bstype_raw[..10], b"LVOLSTORE\0");
    let snap0 = p2.blob(0x1_0000_0003).expect("snap0");
    assert!(snap0.read_only && snap0.thin_provisioned);
    assert_eq!(snap0.clones, vec![0x1_0000_0001, 0x1_0000_0005]);
    assert_eq!(snap0.extent_pages[0].md_page, 2);
    assert_eq!(snap0.extent_pages[0].page_id_field, 0x1_0000_0001);
    let lv0 = p2.blob(0x1_0000_0001).expect("lv0");
    assert_eq!(lv0.xattr("name").map(<[u8]>::len), Some(64));
    assert_eq!(lv0.internal_xattrs["SNAP"], 0x1_0000_0003u64.to_le_bytes());

    let p3 = fixtures::load_manifest("p3-dirty");
    assert_eq!(p3.super_block.clean, 0);
    let r = p3.recovery.as_ref().expect("p3 has a recovery record");
    assert_eq!(r.masks_after_recovery.used_clusters, vec![0, 1, 2, 3]);
    assert_eq!(p3.masks_on_disk.used_clusters.set_bits, vec![0, 1]);
    assert_eq!(r.free_clusters(), 28);
    assert_eq!(r.messages[0], "Performing recovery on blobstore");

    let p4 = fixtures::load_manifest("p4-many-xattrs");
    assert_eq!(p4.super_block.super_blob, None);
    assert_eq!(p4.super_block.super_blob_raw, u64::MAX);
    let blob = &p4.blobs[0];
    assert_eq!(blob.xattrs.len(), 40);
    assert!(blob.xattrs.values().all(|v| v.len() == 200 && v[199] == 0));
    let chain: Vec<_> = blob.md_chain.iter().map(|p| (p.md_page, p.next)).collect();
    assert_eq!(chain, vec![(0, Some(3)), (3, Some(5)), (5, None)]);
}

#[test]
fn pattern_p_matches_its_definition_across_clusters() {
    let mut buf = vec![0u8; 600];
    let start = (1 << 20) - 300; // straddles a 1 MiB cluster boundary
    Pattern::P(13).fill_at(&mut buf, start);
    for (i, &b) in buf.iter().enumerate() {
        let o = start + i as u64;
        assert_eq!(b, ((o * 31 + 13) % 251) as u8, "offset {o}");
    }
    assert_eq!("fill 0x5A".parse(), Ok(Pattern::Fill(0x5A)));
    assert_eq!("zeros".parse(), Ok(Pattern::Zeros));
    assert!("ones".parse::<Pattern>().is_err());
}

#[test]
fn write_image_to_leaves_the_verified_raw_image() {
    let name = "p4-many-xattrs";
    let manifest = fixtures::load_manifest(name);
    let (_dir, path) = fixtures::image_in_tempdir(name);
    let bytes = std::fs::read(&path).expect("read the written image");
    assert_eq!(bytes.len() as u64, manifest.image_bytes);
    assert_eq!(fixtures::sha256_hex(&bytes), manifest.image_sha256);
    assert_eq!(bytes, fixtures::load_image(name));
}
