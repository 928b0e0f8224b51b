//! Goal: the bytes Spool writes are SPDK's layout (docs/format.md, the notes'
//! spdk-ondisk.md). Method: a store made by Spool is unloaded and its raw image decoded here
//! with hand-written offsets (not the crate's decoder): super block fields, the three mask
//! pages, md page headers and CRCs, FLAGS/XATTR descriptors, an RLE blob's extents and an
//! extent-table blob's table and extent page.

mod common;

use common::{create_thin, malloc, pattern, run, runtime, write};
use spool_blob::{BlobOptions, Blobstore, ExtentForm, InitOptions};

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn crc_ok(page: &[u8]) -> bool {
    crc32c::crc32c(&page[..4092]) == u32_at(page, 4092)
}

#[test]
fn a_spool_store_has_spdks_byte_layout() {
    let rt = runtime();
    let (bdev, desc) = malloc(64 << 20);
    run(&rt, move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                bstype: *b"LVOLSTORE\0\0\0\0\0\0\0",
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        // Blob 0: thick, RLE, 3 clusters, one xattr.
        let rle = store
            .create_blob(&BlobOptions {
                num_clusters: 3,
                form: ExtentForm::Rle,
                xattrs: vec![("name".into(), b"hello\0".to_vec())],
                ..BlobOptions::default()
            })
            .await
            .unwrap();
        // Blob 1: thin, extent table, 600 clusters (two extent pages), one written cluster
        // in the second extent page.
        let table = create_thin(&store, 600).await;
        let blob = store.open_blob(table).await.unwrap();
        let channel = store.channel().unwrap();
        write(&channel, &blob.io(), 513 * 256, &pattern(1, 4096)).await;
        drop(channel);
        blob.close().await.unwrap();
        store.set_super(rle).await.unwrap();
        store.unload().await.unwrap();
    });
    rt.stop();
    let image = bdev.snapshot();
    let page = |n: usize| &image[n * 4096..(n + 1) * 4096];

    // Super block.
    let sb = page(0);
    assert_eq!(&sb[0..8], b"SPDKBLOB");
    assert_eq!(u32_at(sb, 8), 3, "version");
    assert_eq!(u32_at(sb, 12), 4096, "length");
    assert_eq!(u32_at(sb, 16), 1, "clean after unload");
    assert_eq!(u64_at(sb, 20), 0x1_0000_0000, "super blob");
    assert_eq!(u32_at(sb, 28), 1 << 20, "cluster size");
    assert_eq!((u32_at(sb, 32), u32_at(sb, 36)), (1, 1), "used page mask");
    assert_eq!(
        (u32_at(sb, 40), u32_at(sb, 44)),
        (2, 1),
        "used cluster mask"
    );
    assert_eq!((u32_at(sb, 48), u32_at(sb, 52)), (4, 64), "md region");
    assert_eq!(&sb[56..72], b"LVOLSTORE\0\0\0\0\0\0\0");
    assert_eq!((u32_at(sb, 72), u32_at(sb, 76)), (3, 1), "used blobid mask");
    assert_eq!(u64_at(sb, 80), 64 << 20, "size");
    assert_eq!(u32_at(sb, 88), 4096, "io_unit");
    assert!(sb[92..4092].iter().all(|&b| b == 0), "reserved");
    assert!(crc_ok(sb));

    // Masks: type, length in bits, LSB-first bits.
    let pages_mask = page(1);
    assert_eq!(pages_mask[0], 0);
    assert_eq!(u32_at(pages_mask, 1), 64);
    let clusters_mask = page(2);
    assert_eq!(clusters_mask[0], 1);
    assert_eq!(u32_at(clusters_mask, 1), 64);
    let ids_mask = page(3);
    assert_eq!(ids_mask[0], 2);
    assert_eq!(u32_at(ids_mask, 1), 64);
    assert_eq!(ids_mask[5], 0b11, "blob ids at md pages 0 and 1");
    // Metadata is cluster 0; the RLE blob has clusters 1-3; the thin one's cluster is 4.
    assert_eq!(clusters_mask[5], 0b1_1111);
    let used_pages: Vec<usize> = (0..64)
        .filter(|&i| pages_mask[5 + i / 8] & (1 << (i % 8)) != 0)
        .collect();
    assert_eq!(
        used_pages.len(),
        3,
        "two roots and one extent page: {used_pages:?}"
    );

    // Blob 0: root page at md page 0 (device page 4), RLE.
    let root = page(4);
    assert!(crc_ok(root));
    assert_eq!(u64_at(root, 0), 0x1_0000_0000, "id");
    assert_eq!(u32_at(root, 8), 0, "sequence");
    assert_eq!(u32_at(root, 4088), u32::MAX, "next");
    // FLAGS: type 3, length 24, invalid 0 (thick, RLE), data_ro 0, md_ro 0.
    assert_eq!(root[16], 3);
    assert_eq!(u32_at(root, 17), 24);
    assert_eq!(
        (u64_at(root, 21), u64_at(root, 29), u64_at(root, 37)),
        (0, 0, 0)
    );
    // XATTR: type 2, length 4 + 4 + 6, name_len 4, value_len 6.
    let x = 16 + 29;
    assert_eq!(root[x], 2);
    assert_eq!(u32_at(root, x + 1), 14);
    assert_eq!(u16::from_le_bytes([root[x + 5], root[x + 6]]), 4);
    assert_eq!(u16::from_le_bytes([root[x + 7], root[x + 8]]), 6);
    assert_eq!(&root[x + 9..x + 13], b"name");
    assert_eq!(&root[x + 13..x + 19], b"hello\0");
    // EXTENT_RLE: type 1, one run {cluster 1, length 3}.
    let e = x + 19;
    assert_eq!(root[e], 1);
    assert_eq!(u32_at(root, e + 1), 8);
    assert_eq!((u32_at(root, e + 5), u32_at(root, e + 9)), (1, 3));
    assert_eq!((root[e + 13], u32_at(root, e + 14)), (0, 0), "end marker");

    // Blob 1: root at md page 1 (device page 5), extent table.
    let root = page(5);
    assert!(crc_ok(root));
    assert_eq!(u64_at(root, 0), 0x1_0000_0001);
    assert_eq!(root[16], 3);
    assert_eq!(u64_at(root, 21), 0b101, "THIN_PROV | EXTENT_TABLE");
    let t = 16 + 29;
    assert_eq!(root[t], 5, "EXTENT_TABLE");
    assert_eq!(u32_at(root, t + 1), 8 + 2 * 8, "num_clusters + two entries");
    assert_eq!(u64_at(root, t + 5), 600);
    // First extent page unallocated: {0, 1}; second: {md page, 1}.
    assert_eq!((u32_at(root, t + 13), u32_at(root, t + 17)), (0, 1));
    let ep_index = u32_at(root, t + 21) as usize;
    assert_eq!(u32_at(root, t + 25), 1);
    let ep = page(4 + ep_index);
    assert!(crc_ok(ep));
    assert_eq!(u64_at(ep, 0), 0x1_0000_0001, "extent page id");
    assert_eq!(u32_at(ep, 8), 0, "extent page sequence");
    assert_eq!(u32_at(ep, 4088), u32::MAX, "extent page next");
    assert_eq!(ep[16], 6, "EXTENT_PAGE");
    assert_eq!(u32_at(ep, 17), 4 + 4 * 88, "start + 600 - 512 entries");
    assert_eq!(u32_at(ep, 21), 512, "start cluster");
    assert_eq!(u32_at(ep, 25), 0, "blob cluster 512 unallocated");
    assert_eq!(u32_at(ep, 29), 4, "blob cluster 513 on device cluster 4");
    // The data is at device cluster 4, offset 0.
    assert_eq!(&image[4 << 20..(4 << 20) + 4096], &pattern(1, 4096)[..]);
}
