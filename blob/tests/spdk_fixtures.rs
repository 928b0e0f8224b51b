//! Goal: every store SPDK v24.01 wrote loads in Spool and reads back exactly what its
//! manifest says, the dirty one through recovery; and a load followed by an unload leaves a
//! clean SPDK image byte for byte as it was (Spool writes the masks and super block exactly
//! as SPDK does). Method: each fixture image on a malloc bdev; every manifest fact compared
//! (geometry, masks, ids, sizes, flags, xattrs, parents and clones, the cluster map, and the
//! sha256 of each blob's whole content read through a blob channel).

mod common;
mod support;

use common::{from_image as malloc_of, runtime};
use spool_bdev::DmaBuf;
use spool_blob::{Blobstore, LoadOptions};
use spool_reactor::Runtime;
use support::fixtures::{self, Manifest};

/// Loads `name`, checks everything against its manifest, unloads; returns the image after.
fn check_fixture(rt: &Runtime, name: &str) -> (Manifest, Vec<u8>, Vec<u8>) {
    let manifest = fixtures::load_manifest(name);
    let image = fixtures::load_image(name);
    let (bdev, desc) = malloc_of(&image);
    let expected = manifest.clone();
    let reactor = rt.reactors()[0];
    rt.block_on(reactor, move || async move {
        let m = &expected;
        let (store, report) = Blobstore::load(desc, &LoadOptions::default())
            .await
            .unwrap_or_else(|err| panic!("{}: load failed: {err}", m.name));
        assert_eq!(report.recovered, !m.is_clean(), "{}: recovery", m.name);
        assert!(
            report.unreadable.is_empty(),
            "{}: {:?}",
            m.name,
            report.unreadable
        );
        let sb = store.super_block();
        assert_eq!(u64::from(sb.md_start), m.super_block.md_start);
        assert_eq!(u64::from(sb.md_len), m.super_block.md_len);
        assert_eq!(store.cluster_size(), m.super_block.cluster_size);
        assert_eq!(store.io_unit_size(), m.super_block.io_unit_size.max(4096));
        assert_eq!(
            store.geometry().total_clusters,
            m.super_block.total_clusters
        );
        assert_eq!(store.geometry().md_clusters, m.super_block.md_clusters);
        assert_eq!(sb.bstype, m.super_block.bstype_raw);
        let free = match &m.recovery {
            Some(recovery) => recovery.free_clusters(),
            None => m.super_block.free_clusters,
        };
        assert_eq!(
            store.free_cluster_count(),
            free,
            "{}: free clusters",
            m.name
        );
        assert_eq!(
            store.used_clusters(),
            fixtures::expected_used_clusters(m),
            "{}: used clusters",
            m.name
        );
        assert_eq!(
            store.used_md_pages(),
            fixtures::expected_used_md_pages(m),
            "{}: used md pages",
            m.name
        );
        let mut ids: Vec<u64> = m.blobs.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        assert_eq!(store.blob_ids(), ids, "{}: blob ids", m.name);
        match m.super_block.super_blob {
            Some(id) => assert_eq!(store.get_super().unwrap(), id),
            None => assert_eq!(store.get_super().unwrap_err().errno(), -libc::ENOENT),
        }
        let channel = store.channel().unwrap();
        for b in &m.blobs {
            let blob = store
                .open_blob(b.id)
                .await
                .unwrap_or_else(|err| panic!("{}: open {:#x}: {err}", m.name, b.id));
            let what = format!("{} blob {:#x}", m.name, b.id);
            assert_eq!(blob.num_clusters(), b.num_clusters, "{what}: clusters");
            assert_eq!(blob.size_bytes(), b.size_bytes, "{what}: size");
            assert_eq!(blob.is_thin(), b.thin_provisioned, "{what}: thin");
            assert_eq!(blob.is_read_only(), b.read_only, "{what}: read-only");
            let flags = blob.flags();
            assert_eq!(
                (flags.invalid, flags.data_ro, flags.md_ro),
                (b.flags.invalid, b.flags.data_ro, b.flags.md_ro),
                "{what}: flags"
            );
            let xattrs: std::collections::BTreeMap<String, Vec<u8>> = blob
                .xattrs()
                .into_iter()
                .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
                .collect();
            assert_eq!(xattrs, b.xattrs, "{what}: xattrs");
            let internal: std::collections::BTreeMap<String, Vec<u8>> = blob
                .internal_xattrs()
                .into_iter()
                .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
                .collect();
            assert_eq!(internal, b.internal_xattrs, "{what}: internal xattrs");
            assert_eq!(blob.parent_id(), b.parent_snapshot_id, "{what}: parent");
            assert_eq!(
                store.parent_of(b.id),
                b.parent_snapshot_id,
                "{what}: parent in the graph"
            );
            assert_eq!(store.clones_of(b.id), b.clones, "{what}: clones");
            let map = blob.cluster_map();
            let allocated: Vec<(u64, u64)> = map
                .iter()
                .enumerate()
                .filter(|(_, &c)| c != 0)
                .map(|(i, &c)| (i as u64, u64::from(c)))
                .collect();
            assert_eq!(allocated, b.allocated_clusters, "{what}: cluster map");
            let mut content = Vec::with_capacity(b.size_bytes as usize);
            let unit = store.io_unit_size();
            let chunk = store.cluster_size();
            let mut at = 0u64;
            while at < b.size_bytes {
                let (result, buf) = channel
                    .read(
                        &blob.io(),
                        at / unit,
                        DmaBuf::alloc(chunk as usize).unwrap(),
                    )
                    .await;
                result.unwrap_or_else(|err| panic!("{what}: read at {at}: {err}"));
                content.extend_from_slice(&buf);
                at += chunk;
            }
            assert_eq!(
                fixtures::sha256_hex(&content),
                b.sha256,
                "{what}: content sha256"
            );
            assert!(
                content == fixtures::expected_content(m, b),
                "{what}: content"
            );
            blob.close().await.unwrap();
        }
        drop(channel);
        store.unload().await.unwrap();
    })
    .unwrap();
    let after = bdev.snapshot();
    (manifest, image, after)
}

#[test]
fn every_spdk_fixture_reads_back_as_its_manifest_says() {
    let rt = runtime();
    let names = fixtures::fixture_names();
    assert!(names.len() >= 4, "fixtures found: {names:?}");
    for name in &names {
        let (manifest, before, after) = check_fixture(&rt, name);
        if manifest.is_clean() {
            // Load then unload rewrites the masks and the super block: byte for byte SPDK's.
            let differing: Vec<usize> = (0..before.len() / 4096)
                .filter(|&page| {
                    before[page * 4096..(page + 1) * 4096] != after[page * 4096..(page + 1) * 4096]
                })
                .collect();
            assert!(
                differing.is_empty(),
                "{name}: pages changed by load+unload: {differing:?}"
            );
        } else {
            // A dirty image comes back clean, with the masks SPDK's recovery rebuilt.
            let recovery = manifest.recovery.as_ref().unwrap();
            let (_b, desc) = malloc_of(&after);
            let expected_free = recovery.free_clusters();
            rt.block_on(rt.reactors()[0], move || async move {
                let (store, report) = Blobstore::load(desc, &LoadOptions::default())
                    .await
                    .unwrap();
                assert!(!report.recovered, "unload left it clean");
                assert_eq!(store.free_cluster_count(), expected_free);
                store.unload().await.unwrap();
            })
            .unwrap();
        }
    }
    rt.stop();
}
