//! Goal: Spool's lvol stores are SPDK's: a store SPDK v24.01 made (fixture p2) opens with its
//! names, uuids, aliases and snapshot graph; a store Spool makes has the bytes SPDK writes
//! (the whole p2 image is rebuilt by the lvol API and compared page by page, the random
//! uuids aside); names are unique and bounded with SPDK's errnos; every lvol operation maps
//! onto the blobstore's. Method: malloc bdevs on one reactor; raw xattr bytes read back after
//! an unload and a load; a proptest runs random name operations against a plain model.

mod common;
mod support;

use std::collections::BTreeMap;

use common::{from_image, malloc, malloc_blocks, read, run, runtime, write};
use proptest::prelude::*;
use spool_blob::lvol::xattr::{NAME_XATTR, UUID_XATTR};
use spool_blob::lvol::Uuid;
use spool_blob::{Blob, BlobOptions, Blobstore, InitOptions, LvolStore, LvsInitOptions};
use support::fixtures;

const MIB: u64 = 1 << 20;

fn lvs_options(name: &str) -> LvsInitOptions {
    LvsInitOptions {
        name: name.into(),
        init: InitOptions {
            cluster_size: MIB,
            ..InitOptions::default()
        },
    }
}

/// The raw value of xattr `name` of blob `id`.
async fn raw_xattr(store: &Blobstore, id: u64, name: &str) -> Option<Vec<u8>> {
    let blob = store.open_blob(id).await.unwrap();
    let value = blob.xattr(name);
    blob.close().await.unwrap();
    value
}

fn padded(name: &str) -> Vec<u8> {
    let mut value = name.as_bytes().to_vec();
    value.resize(64, 0);
    value
}

fn uuid_bytes(uuid: &Uuid) -> Vec<u8> {
    format!("{}\0", uuid.hyphenated()).into_bytes()
}

#[test]
fn names_uuids_and_aliases_survive_an_unload_and_read_back_byte_exact() {
    let rt = runtime();
    let (bdev, desc) = malloc(64 * MIB);
    let made = run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        assert_eq!(lvs.name(), "lvs0");
        assert_eq!(lvs.uuid().get_version_num(), 4, "a random (v4) uuid");
        let lv0 = lvs.create_lvol("lv0", 16 * MIB, true).await.unwrap();
        let thick = lvs.create_lvol("thick", 5 * MIB / 2, false).await.unwrap();
        let snap = lvs.create_snapshot(lv0.id, "snap0").await.unwrap();
        let clone = lvs.create_clone(snap.id, "clone0").await.unwrap();
        assert_eq!(lv0.alias, "lvs0/lv0");
        assert_eq!(lv0.unique_id, lv0.uuid.hyphenated().to_string());
        let info = lvs.info(thick.id).await.unwrap();
        assert_eq!(
            info.num_clusters, 3,
            "2.5 MiB rounds up to 3 clusters, as SPDK"
        );
        assert!(!info.thin);
        let lvols = lvs.lvols();
        lvs.unload().await.unwrap();
        (lvols, lv0, snap, clone)
    });
    let (lvols, lv0, snap, clone) = made;
    rt.stop();
    let image = bdev.snapshot();
    assert_eq!(&image[56..72], b"LVOLSTORE\0\0\0\0\0\0\0", "bstype");

    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (lvs, report) = LvolStore::load(desc).await.unwrap();
        assert!(!report.recovered);
        assert_eq!(lvs.name(), "lvs0");
        assert_eq!(lvs.lvols(), lvols, "names, uuids, aliases as before");
        let store = lvs.blobstore().clone();
        let super_id = lvs.super_blob_id();
        assert_eq!(store.get_super().unwrap(), super_id);
        assert_eq!(
            raw_xattr(&store, super_id, NAME_XATTR).await.unwrap(),
            b"lvs0\0",
            "the store's name: NUL-terminated, not padded"
        );
        assert_eq!(
            raw_xattr(&store, super_id, UUID_XATTR).await.unwrap(),
            uuid_bytes(&lvs.uuid())
        );
        let blob = store.open_blob(super_id).await.unwrap();
        assert_eq!(blob.xattr_names(), ["uuid", "name"], "SPDK sets uuid first");
        assert_eq!(blob.num_clusters(), 0);
        blob.close().await.unwrap();
        for lvol in lvs.lvols() {
            let name = raw_xattr(&store, lvol.id, NAME_XATTR).await.unwrap();
            assert_eq!(
                name,
                padded(&lvol.name),
                "{}: 64 bytes, NUL-padded",
                lvol.name
            );
            let uuid = raw_xattr(&store, lvol.id, UUID_XATTR).await.unwrap();
            assert_eq!(uuid.len(), 37);
            assert_eq!(
                uuid,
                uuid_bytes(&lvol.uuid),
                "{}: 36 chars + NUL",
                lvol.name
            );
            assert_eq!(uuid, uuid.to_ascii_lowercase(), "lower case, as SPDK");
            let blob = store.open_blob(lvol.id).await.unwrap();
            assert_eq!(blob.xattr_names(), ["name", "uuid"], "SPDK's order");
            blob.close().await.unwrap();
        }
        for text in [
            "lvs0/lv0".to_string(),
            "lv0".to_string(),
            lv0.uuid.to_string(),
            lv0.uuid.hyphenated().to_string().to_uppercase(),
        ] {
            assert_eq!(lvs.lookup(&text).unwrap().id, lv0.id, "lookup {text}");
        }
        let snap_info = lvs.info(snap.id).await.unwrap();
        assert!(snap_info.read_only);
        assert!(snap_info.thin);
        assert!(snap_info.snapshot);
        let mut clones: Vec<String> = snap_info.clones.into_iter().map(|(_, n)| n).collect();
        clones.sort();
        assert_eq!(clones, ["clone0", "lv0"]);
        let clone_info = lvs.info(clone.id).await.unwrap();
        assert!(clone_info.clone);
        assert_eq!(clone_info.parent, Some((snap.id, "snap0".to_string())));
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn spdks_p2_store_opens_as_an_lvol_store_with_its_names_and_uuids() {
    let manifest = fixtures::load_manifest("p2-lvs-thin-snap");
    let image = fixtures::load_image("p2-lvs-thin-snap");
    let expected: BTreeMap<u64, (Vec<u8>, Vec<u8>)> = manifest
        .blobs
        .iter()
        .map(|blob| {
            let name = blob.xattr("name").unwrap().to_vec();
            let uuid = blob.xattr("uuid").unwrap().to_vec();
            (blob.id, (name, uuid))
        })
        .collect();
    let rt = runtime();
    let (_bdev, desc) = from_image(&image);
    run(&rt, move || async move {
        let (lvs, _) = LvolStore::load(desc).await.unwrap();
        let super_id = lvs.super_blob_id();
        assert_eq!(super_id, 0x1_0000_0000);
        let (name, uuid) = &expected[&super_id];
        assert_eq!(name, b"lvs0\0");
        assert_eq!(lvs.name(), "lvs0");
        assert_eq!(
            uuid_bytes(&lvs.uuid()),
            *uuid,
            "the store's uuid as SPDK wrote it"
        );
        let lvols = lvs.lvols();
        let names: Vec<&str> = lvols.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["lv0", "snap0", "clone0"]);
        for lvol in &lvols {
            let (name, uuid) = &expected[&lvol.id];
            assert_eq!(padded(&lvol.name), *name, "{}", lvol.name);
            assert_eq!(uuid_bytes(&lvol.uuid), *uuid, "{}", lvol.name);
            assert_eq!(lvol.alias, format!("lvs0/{}", lvol.name));
            assert_eq!(lvs.lookup(&lvol.uuid.to_string()).unwrap(), *lvol);
            assert_eq!(lvs.lookup(&lvol.alias).unwrap(), *lvol);
        }
        let infos = lvs.list().await.unwrap();
        let by_name = |name: &str| infos.iter().find(|i| i.lvol.name == name).unwrap();
        let (lv0, snap0, clone0) = (by_name("lv0"), by_name("snap0"), by_name("clone0"));
        assert!(snap0.snapshot);
        assert!(snap0.read_only);
        assert!(snap0.thin);
        assert_eq!(
            snap0.clones,
            [
                (lv0.lvol.id, "lv0".into()),
                (clone0.lvol.id, "clone0".into())
            ]
        );
        for clone in [lv0, clone0] {
            assert!(clone.clone);
            assert!(clone.thin);
            assert!(!clone.read_only);
            assert_eq!(clone.parent, Some((snap0.lvol.id, "snap0".into())));
            assert_eq!(clone.size_bytes, 16 * MIB);
        }
        assert_eq!(lv0.num_allocated_clusters, 3);
        let err = lvs.delete_lvol(snap0.lvol.id).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "{err}");
        let err = lvs.lookup("lvs0/nothing").unwrap_err();
        assert_eq!(err.errno(), -libc::ENOENT, "{err}");
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

/// Writes `P(seed)` (the fixtures' pattern) at blob bytes `[start, start + len)` of `blob`,
/// in 64 KiB pieces in order (as spdk_dd wrote them).
async fn write_pattern(store: &Blobstore, blob: &Blob, seed: u64, start: u64, len: u64) {
    let channel = store.channel().unwrap();
    let unit = store.io_unit_size();
    let mut at = start;
    while at < start + len {
        let piece = (start + len - at).min(64 << 10);
        let data: Vec<u8> = (at..at + piece)
            .map(|o| fixtures::pattern_byte(seed, o))
            .collect();
        write(&channel, &blob.io(), at / unit, &data).await;
        at += piece;
    }
}

/// `image` with every occurrence of `from` replaced by `to` inside md page `page` of the md
/// region at `md_start`, and that page's CRC recomputed.
fn replace_in_md_page(image: &mut [u8], md_start: usize, page: usize, from: &[u8], to: &[u8]) {
    let start = (md_start + page) * 4096;
    let bytes = &mut image[start..start + 4096];
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .unwrap_or_else(|| panic!("md page {page}: uuid not found"));
    bytes[at..at + to.len()].copy_from_slice(to);
    let crc = crc32c::crc32c(&bytes[..4092]);
    bytes[4092..].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_store_made_with_the_lvol_api_is_spdks_p2_image_byte_for_byte_but_the_uuids() {
    // What SPDK did to make p2 (its manifest's `how_made`), done with the lvol API.
    let manifest = fixtures::load_manifest("p2-lvs-thin-snap");
    let spdk = fixtures::load_image("p2-lvs-thin-snap");
    let rt = runtime();
    let (bdev, desc) = malloc(64 * MIB);
    let uuids = run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        let store = lvs.blobstore().clone();
        // Each blob stays open across its writes: a blob reopened from disk moves its extent
        // page at its next thin write (Spool never rewrites a page an older root may still
        // name), where SPDK rewrites it in place; the pages would then differ in number.
        let lv0 = lvs.create_lvol("lv0", 16 * MIB, true).await.unwrap();
        let lv0_blob = store.open_blob(lv0.id).await.unwrap();
        write_pattern(&store, &lv0_blob, 11, 0, 0x18_0000).await;
        write_pattern(&store, &lv0_blob, 12, 0x50_0000, 0x10_0000).await;
        write_pattern(&store, &lv0_blob, 13, 0xa4_0000, 0x2000).await;
        let snap0 = lvs.create_snapshot(lv0.id, "snap0").await.unwrap();
        write_pattern(&store, &lv0_blob, 21, 0x10_0000, 0x18_0000).await;
        write_pattern(&store, &lv0_blob, 22, 0x70_0000, 0x10_0000).await;
        lv0_blob.close().await.unwrap();
        let clone0 = lvs.create_clone(snap0.id, "clone0").await.unwrap();
        let clone0_blob = store.open_blob(clone0.id).await.unwrap();
        write_pattern(&store, &clone0_blob, 31, 0x58_0000, 0x1_0000).await;
        write_pattern(&store, &clone0_blob, 32, 0xf0_0000, 0x10_0000).await;
        clone0_blob.close().await.unwrap();
        let uuids = vec![
            (lvs.super_blob_id(), lvs.uuid()),
            (lv0.id, lv0.uuid),
            (snap0.id, snap0.uuid),
            (clone0.id, clone0.uuid),
        ];
        lvs.unload().await.unwrap();
        uuids
    });
    rt.stop();
    let mut ours = bdev.snapshot();
    assert_eq!(ours.len(), spdk.len());
    let md_start = manifest.super_block.md_start as usize;
    for (id, uuid) in uuids {
        let theirs = manifest
            .blob(id)
            .unwrap_or_else(|| panic!("blob {id:#x} is not one of p2's"))
            .xattr("uuid")
            .unwrap()
            .to_vec();
        let page = (id & 0xffff_ffff) as usize;
        replace_in_md_page(&mut ours, md_start, page, &uuid_bytes(&uuid), &theirs);
    }
    let md_end = (md_start + manifest.super_block.md_len as usize) * 4096;
    for page in 0..md_end / 4096 {
        let range = page * 4096..(page + 1) * 4096;
        assert!(
            ours[range.clone()] == spdk[range.clone()],
            "page {page} (md page {}) differs from SPDK's",
            page as i64 - md_start as i64
        );
    }
    let cluster = MIB as usize;
    for index in 0..spdk.len() / cluster {
        let range = index * cluster..(index + 1) * cluster;
        assert!(
            ours[range.clone()] == spdk[range.clone()],
            "device cluster {index} differs from SPDK's"
        );
    }
}

#[test]
fn names_are_unique_and_bounded_with_spdks_errnos() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 * MIB);
    run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        let a = lvs.create_lvol("a", MIB, true).await.unwrap();
        fn errno<T>(result: spool_blob::Result<T>) -> i32 {
            result.map(drop).unwrap_err().errno()
        }
        assert_eq!(errno(lvs.create_lvol("a", MIB, true).await), -libc::EEXIST);
        assert_eq!(errno(lvs.create_snapshot(a.id, "a").await), -libc::EEXIST);
        let long = "x".repeat(64);
        assert_eq!(
            errno(lvs.create_lvol(&long, MIB, true).await),
            -libc::EINVAL
        );
        assert_eq!(errno(lvs.create_lvol("", MIB, true).await), -libc::EINVAL);
        let longest = "y".repeat(63);
        let y = lvs.create_lvol(&longest, MIB, true).await.unwrap();
        assert_eq!(lvs.lookup(&longest).unwrap().id, y.id);
        assert_eq!(errno(lvs.rename_lvol(y.id, "a").await), -libc::EEXIST);
        assert_eq!(errno(lvs.rename_lvol(y.id, &long).await), -libc::EINVAL);
        lvs.rename_lvol(y.id, &longest).await.unwrap();
        assert_eq!(errno(lvs.lookup("nothing")), -libc::ENOENT);
        assert_eq!(errno(lvs.lookup("lvs0/nothing")), -libc::ENOENT);
        assert_eq!(errno(lvs.lvol(0x1_0000_0042)), -libc::ENOENT);
        assert_eq!(errno(lvs.delete_lvol(0x1_0000_0042).await), -libc::ENOENT);
        assert_eq!(errno(lvs.resize(0x1_0000_0042, MIB).await), -libc::ENOENT);
        assert_eq!(
            errno(lvs.lvol(lvs.super_blob_id())),
            -libc::ENOENT,
            "the super blob is not an lvol"
        );
        assert_eq!(errno(lvs.rename(&long).await), -libc::EINVAL);
        // Two creates of one name at once: the name is reserved before either awaits.
        let (l1, l2) = (lvs.clone(), lvs.clone());
        let first = spool_reactor::spawn_local(async move { l1.create_lvol("b", MIB, true).await });
        let second =
            spool_reactor::spawn_local(async move { l2.create_lvol("b", MIB, true).await });
        let results = [first.await.unwrap(), second.await.unwrap()];
        let made = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(made, 1, "exactly one create of 'b' succeeds");
        let refused = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(refused.errno(), -libc::EEXIST);
        assert_eq!(lvs.lvols().iter().filter(|l| l.name == "b").count(), 1);
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn renames_write_the_name_as_spdk_does_and_aliases_follow() {
    let rt = runtime();
    let (bdev, desc) = malloc(64 * MIB);
    let id = run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        let lv = lvs.create_lvol("old", MIB, true).await.unwrap();
        lvs.rename_lvol(lv.id, "new").await.unwrap();
        lvs.rename("store1").await.unwrap();
        assert_eq!(lvs.lookup("store1/new").unwrap().id, lv.id);
        assert_eq!(lvs.lookup("lvs0/new").unwrap_err().errno(), -libc::ENOENT);
        assert_eq!(lvs.lookup("old").unwrap_err().errno(), -libc::ENOENT);
        lvs.unload().await.unwrap();
        lv.id
    });
    rt.stop();
    let rt = runtime();
    let (_bdev, desc) = from_image(&bdev.snapshot());
    run(&rt, move || async move {
        let (lvs, _) = LvolStore::load(desc).await.unwrap();
        let store = lvs.blobstore().clone();
        assert_eq!(lvs.name(), "store1");
        assert_eq!(
            raw_xattr(&store, lvs.super_blob_id(), NAME_XATTR)
                .await
                .unwrap(),
            b"store1\0"
        );
        assert_eq!(
            raw_xattr(&store, id, NAME_XATTR).await.unwrap(),
            b"new\0",
            "spdk_lvol_rename writes strlen + 1 bytes, unpadded"
        );
        assert_eq!(lvs.lookup("store1/new").unwrap().id, id);
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn deletes_follow_spdks_rules() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 * MIB);
    run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        let store = lvs.blobstore().clone();
        let origin = lvs.create_lvol("origin", 4 * MIB, true).await.unwrap();
        let blob = store.open_blob(origin.id).await.unwrap();
        write_pattern(&store, &blob, 5, 0, 2 * MIB).await;
        blob.close().await.unwrap();
        let snap = lvs.create_snapshot(origin.id, "snap").await.unwrap();
        let clone = lvs.create_clone(snap.id, "clone").await.unwrap();
        let err = lvs.delete_lvol(snap.id).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "two clones: {err}");
        // An open lvol is busy too.
        let held = store.open_blob(clone.id).await.unwrap();
        let err = lvs.delete_lvol(clone.id).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EBUSY, "open: {err}");
        held.close().await.unwrap();
        lvs.delete_lvol(clone.id).await.unwrap();
        assert_eq!(lvs.lookup("clone").unwrap_err().errno(), -libc::ENOENT);
        // One clone left: the snapshot is merged into it, which keeps its name and uuid.
        lvs.delete_lvol(snap.id).await.unwrap();
        assert_eq!(lvs.lookup("snap").unwrap_err().errno(), -libc::ENOENT);
        assert_eq!(lvs.lookup("origin").unwrap(), origin);
        let info = lvs.info(origin.id).await.unwrap();
        assert!(!info.clone);
        assert_eq!(info.parent, None);
        let blob = store.open_blob(origin.id).await.unwrap();
        let channel = store.channel().unwrap();
        let unit = store.io_unit_size();
        let data = read(&channel, &blob.io(), MIB / unit, 4096).await;
        let expected: Vec<u8> = (MIB..MIB + 4096)
            .map(|o| fixtures::pattern_byte(5, o))
            .collect();
        assert_eq!(data, expected, "the merged data is the clone's now");
        drop(channel);
        blob.close().await.unwrap();
        lvs.delete_lvol(origin.id).await.unwrap();
        assert_eq!(lvs.lvol_count(), 0);
        assert_eq!(store.blob_ids(), [lvs.super_blob_id()]);
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn resize_read_only_inflate_and_decouple_map_onto_the_blobstore() {
    let rt = runtime();
    let (_bdev, desc) = malloc(64 * MIB);
    run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap();
        let store = lvs.blobstore().clone();
        let lv = lvs.create_lvol("lv", 2 * MIB, false).await.unwrap();
        lvs.resize(lv.id, 4 * MIB + 1).await.unwrap();
        assert_eq!(lvs.info(lv.id).await.unwrap().num_clusters, 5);
        let err = lvs.resize(lv.id, 1 << 40).await.unwrap_err();
        assert_eq!(err.errno(), -libc::ENOSPC, "{err}");
        let snap = lvs.create_snapshot(lv.id, "s1").await.unwrap();
        let snap2 = lvs.create_snapshot(lv.id, "s2").await.unwrap();
        assert_eq!(lvs.info(lv.id).await.unwrap().parent.unwrap().1, "s2");
        lvs.decouple_parent(lv.id).await.unwrap();
        assert_eq!(lvs.info(lv.id).await.unwrap().parent.unwrap().1, "s1");
        lvs.inflate(lv.id).await.unwrap();
        let info = lvs.info(lv.id).await.unwrap();
        assert_eq!(info.parent, None);
        assert!(!info.thin);
        assert_eq!(info.num_allocated_clusters, 5);
        let err = lvs.decouple_parent(lv.id).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EINVAL, "no parent: {err}");
        lvs.set_read_only(lv.id).await.unwrap();
        assert!(lvs.info(lv.id).await.unwrap().read_only);
        let err = lvs.resize(lv.id, MIB).await.unwrap_err();
        assert_eq!(err.errno(), -libc::EPERM, "{err}");
        for id in [snap2.id, snap.id, lv.id] {
            lvs.delete_lvol(id).await.unwrap();
        }
        assert_eq!(store.blob_ids(), [lvs.super_blob_id()]);
        lvs.unload().await.unwrap();
    });
    rt.stop();
}

#[test]
fn open_refuses_what_spdks_loader_refuses() {
    let rt = runtime();
    run(&rt, move || async move {
        // Untyped store: -ENXIO.
        let (_b1, desc) = malloc(16 * MIB);
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        let err = LvolStore::open(store.clone()).await.err().unwrap();
        assert_eq!(err.errno(), -libc::ENXIO, "{err}");
        // format refuses a store holding blobs, then makes one of an empty store.
        let id = store.create_blob(&BlobOptions::default()).await.unwrap();
        let err = LvolStore::format(store.clone(), "x").await.err().unwrap();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
        store.delete_blob(id).await.unwrap();
        let lvs = LvolStore::format(store.clone(), "x").await.unwrap();
        assert_eq!(lvs.name(), "x");
        let err = LvolStore::format(store.clone(), "y").await.err().unwrap();
        assert_eq!(err.errno(), -libc::EEXIST, "{err}");
        store.unload().await.unwrap();

        // LVOLSTORE without a super blob: -ENODEV.
        let (_b2, desc) = malloc(16 * MIB);
        let init = InitOptions {
            bstype: *b"LVOLSTORE\0\0\0\0\0\0\0",
            ..InitOptions::default()
        };
        let store = Blobstore::init(desc, &init).await.unwrap();
        let err = LvolStore::open(store.clone()).await.err().unwrap();
        assert_eq!(err.errno(), -libc::ENODEV, "{err}");
        // A super blob with a bad uuid: -EINVAL.
        let super_blob = store
            .create_blob(&BlobOptions {
                xattrs: vec![
                    ("uuid".into(), b"not-a-uuid\0".to_vec()),
                    ("name".into(), b"lvs\0".to_vec()),
                ],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        store.set_super(super_blob).await.unwrap();
        let err = LvolStore::open(store.clone()).await.err().unwrap();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
        let blob = store.open_blob(super_blob).await.unwrap();
        let lvs_uuid = Uuid::new_v4();
        blob.set_xattr("uuid", &uuid_bytes(&lvs_uuid)).unwrap();
        blob.close().await.unwrap();
        // An lvol without a valid uuid: nil, and SPDK's fallback id.
        let bare = store
            .create_blob(&BlobOptions {
                xattrs: vec![("name".into(), padded("bare"))],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        let lvs = LvolStore::open(store.clone()).await.unwrap();
        let lvol = lvs.lookup("bare").unwrap();
        assert!(lvol.uuid.is_nil());
        assert_eq!(lvol.unique_id, format!("{lvs_uuid}_{bare}"));
        assert_eq!(lvs.lookup(&lvol.unique_id).unwrap().id, bare);
        // A blob without a name fails the whole store, as SPDK.
        let nameless = store.create_blob(&BlobOptions::default()).await.unwrap();
        let err = LvolStore::open(store.clone()).await.err().unwrap();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
        store.delete_blob(nameless).await.unwrap();
        // A name over 64 bytes too.
        let blob = store.open_blob(bare).await.unwrap();
        blob.set_xattr("name", &[b'n'; 65]).unwrap();
        blob.close().await.unwrap();
        let err = LvolStore::open(store.clone()).await.err().unwrap();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
        store.unload().await.unwrap();

        // load of a store that is not an lvol store: -ENXIO.
        let (plain, desc) = malloc(16 * MIB);
        let store = Blobstore::init(desc, &InitOptions::default())
            .await
            .unwrap();
        store.unload().await.unwrap();
        let (_b4, desc) = from_image(&plain.snapshot());
        let err = LvolStore::load(desc).await.err().unwrap();
        assert_eq!(err.errno(), -libc::ENXIO, "{err}");
        // And the wrong bstype at init: -EINVAL, nothing written.
        let (_b5, desc) = malloc(16 * MIB);
        let mut options = lvs_options("lvs");
        options.init.bstype = *b"BLOBFS\0\0\0\0\0\0\0\0\0\0";
        let err = LvolStore::init(desc, &options).await.err().unwrap();
        assert_eq!(err.errno(), -libc::EINVAL, "{err}");
    });
    rt.stop();
}

#[test]
fn a_512_byte_block_device_gets_a_512_byte_io_unit() {
    let rt = runtime();
    let (bdev, desc) = malloc_blocks(16 * MIB, 512);
    run(&rt, move || async move {
        let lvs = LvolStore::init(desc, &lvs_options("small")).await.unwrap();
        assert_eq!(lvs.blobstore().io_unit_size(), 512);
        let lv = lvs.create_lvol("lv", MIB, true).await.unwrap();
        let store = lvs.blobstore().clone();
        let blob = store.open_blob(lv.id).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 3, &[7u8; 512]).await;
        assert_eq!(read(&channel, &blob.io(), 3, 512).await, [7u8; 512]);
        drop(channel);
        blob.close().await.unwrap();
        lvs.unload().await.unwrap();
    });
    rt.stop();
    let image = bdev.snapshot();
    assert_eq!(u32::from_le_bytes(image[88..92].try_into().unwrap()), 512);
}

/// One step of the name model test.
#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Rename(usize, usize),
    Delete(usize),
    Snapshot(usize, usize),
    Reload,
}

const NAMES: [&str; 5] = ["a", "b", "c", "dd", "e/e"];

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    prop_oneof![
        3 => name.clone().prop_map(Op::Create),
        2 => (name.clone(), name.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        2 => name.clone().prop_map(Op::Delete),
        2 => (name.clone(), name).prop_map(|(a, b)| Op::Snapshot(a, b)),
        1 => Just(Op::Reload),
    ]
}

/// Applies `op` to the store and to the model (name -> blob id), checking the outcome the
/// model predicts.
async fn step(lvs: &LvolStore, model: &mut BTreeMap<String, u64>, op: &Op) {
    let errno = |r: spool_blob::Result<()>| r.err().map(|e| e.errno());
    match op {
        Op::Create(n) => {
            let name = NAMES[*n];
            let got = errno(lvs.create_lvol(name, MIB, true).await.map(drop));
            let want = model.contains_key(name).then_some(-libc::EEXIST);
            assert_eq!(got, want, "{op:?}");
            if want.is_none() {
                let id = lvs.lookup(name).unwrap().id;
                model.insert(name.into(), id);
            }
        }
        Op::Rename(a, b) => {
            let (from, to) = (NAMES[*a], NAMES[*b]);
            let Some(&id) = model.get(from) else {
                assert_eq!(lvs.lookup(from).unwrap_err().errno(), -libc::ENOENT);
                return;
            };
            let read_only = lvs.info(id).await.unwrap().read_only;
            let got = errno(lvs.rename_lvol(id, to).await);
            if read_only {
                // A snapshot's metadata is read-only (as in SPDK): a rename is refused, with
                // -EPERM, or -EEXIST when the name is taken and that is checked first (to
                // its own name it may also be a no-op).
                let refused = matches!(got, Some(e) if e == -libc::EPERM || e == -libc::EEXIST);
                assert!(refused || (from == to && got.is_none()), "{op:?}: {got:?}");
                return;
            }
            let want = (from != to && model.contains_key(to)).then_some(-libc::EEXIST);
            assert_eq!(got, want, "{op:?}");
            if want.is_none() {
                model.remove(from);
                model.insert(to.into(), id);
            }
        }
        Op::Delete(n) => {
            let name = NAMES[*n];
            let Some(&id) = model.get(name) else {
                return;
            };
            let clones = lvs.blobstore().clones_of(id).len();
            let got = errno(lvs.delete_lvol(id).await);
            let want = (clones > 1).then_some(-libc::EBUSY);
            assert_eq!(got, want, "{op:?}");
            if want.is_none() {
                model.remove(name);
            }
        }
        Op::Snapshot(a, b) => {
            let (origin, name) = (NAMES[*a], NAMES[*b]);
            let Some(&id) = model.get(origin) else {
                return;
            };
            if lvs.info(id).await.unwrap().read_only {
                return;
            }
            let got = errno(lvs.create_snapshot(id, name).await.map(drop));
            let want = model.contains_key(name).then_some(-libc::EEXIST);
            assert_eq!(got, want, "{op:?}");
            if want.is_none() {
                model.insert(name.into(), lvs.lookup(name).unwrap().id);
            }
        }
        Op::Reload => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn names_behave_like_a_map_of_unique_keys(ops in proptest::collection::vec(op(), 1..20)) {
        let rt = runtime();
        let mut image: Option<Vec<u8>> = None;
        let mut model = BTreeMap::new();
        // Each run of operations between two reloads works on a store loaded from the image
        // the run before it unloaded.
        for batch in ops.split(|op| matches!(op, Op::Reload)) {
            let (bdev, desc) = match &image {
                None => malloc(16 * MIB),
                Some(bytes) => from_image(bytes),
            };
            let fresh = image.is_none();
            let (batch, model_in) = (batch.to_vec(), model.clone());
            model = run(&rt, move || async move {
                let lvs = if fresh {
                    LvolStore::init(desc, &lvs_options("lvs0")).await.unwrap()
                } else {
                    LvolStore::load(desc).await.unwrap().0
                };
                let mut model = model_in;
                for op in &batch {
                    step(&lvs, &mut model, op).await;
                }
                let names: BTreeMap<String, u64> =
                    lvs.lvols().into_iter().map(|l| (l.name, l.id)).collect();
                assert_eq!(names, model, "the store's names are the model's");
                lvs.unload().await.unwrap();
                model
            });
            image = Some(bdev.snapshot());
        }
        rt.stop();
    }
}
