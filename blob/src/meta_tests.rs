//! Unit tests of `meta`: chains round-trip in both extent forms, refusals, the RLE merge bug.
use super::*;

struct AnyCluster;
impl ClusterCheck for AnyCluster {
    fn cluster_ok(&self, cluster: u32) -> bool {
        cluster < 10_000
    }
    fn md_page_ok(&self, page: u32) -> bool {
        page < 10_000
    }
}

fn chain_pages(meta: &BlobMeta, continuation: &[u32]) -> Vec<Vec<u8>> {
    let areas = serialize_chain(meta).unwrap();
    assert!(areas.len() <= continuation.len() + 1);
    areas
        .iter()
        .enumerate()
        .map(|(i, area)| {
            let next = continuation
                .get(i)
                .copied()
                .filter(|_| i + 1 < areas.len())
                .unwrap_or(INVALID_MD_PAGE);
            encode_page(meta.id, i as u32, next, area.bytes())
        })
        .collect()
}

fn parse(meta: &BlobMeta, pages: &[Vec<u8>]) -> Result<BlobMeta> {
    let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let mut parsed = parse_chain(meta.id, &refs, &AnyCluster)?;
    for (index, _) in parsed.pending_extent_pages.clone() {
        let page = encode_extent_page(meta, index);
        apply_extent_page(&mut parsed.meta, index, &page, &AnyCluster)?;
    }
    Ok(parsed.meta)
}

#[test]
fn rle_never_merges_an_allocated_cluster_into_an_unallocated_run() {
    // The seed's bug: [0, 0, 2] merged into one {0, 3} run and lost cluster 2.
    assert_eq!(rle_runs(&[0, 0, 2]), vec![(0, 2), (2, 1)]);
    assert_eq!(
        rle_runs(&[5, 6, 7, 9, 0, 0, 10]),
        vec![(5, 3), (9, 1), (0, 2), (10, 1)]
    );
    let mut meta = BlobMeta::new(0x1_0000_0001, true, ExtentForm::Rle);
    meta.clusters = vec![0, 0, 2];
    let pages = chain_pages(&meta, &[]);
    assert_eq!(parse(&meta, &pages).unwrap(), meta);
}

#[test]
fn both_extent_forms_round_trip_with_many_xattrs_over_several_pages() {
    for form in [ExtentForm::Rle, ExtentForm::Table] {
        let mut meta = BlobMeta::new(0x1_0000_0004, true, form);
        for i in 0..40 {
            meta.set_xattr(
                false,
                format!("xattr_{i:02}").as_bytes(),
                &[b'a' + (i % 26) as u8; 200],
            )
            .unwrap();
        }
        meta.set_xattr(true, b"SNAP", &7u64.to_le_bytes()).unwrap();
        meta.clusters = (0..1500u32)
            .map(|i| if i % 3 == 0 { 0 } else { 100 + i * 2 })
            .collect();
        if form == ExtentForm::Table {
            meta.extent_pages = vec![11, 0, 12];
        }
        let pages = chain_pages(&meta, &[20, 21, 22, 23, 24, 25]);
        assert!(pages.len() >= 3, "40 xattrs of 200 bytes span pages");
        let parsed = parse(&meta, &pages).unwrap();
        if form == ExtentForm::Table {
            // Extent page 1 is unallocated, so its clusters read back as 0.
            let mut expected = meta.clone();
            expected.clusters[512..1024].iter_mut().for_each(|c| *c = 0);
            assert_eq!(parsed, expected);
        } else {
            assert_eq!(parsed, meta);
        }
        assert_eq!(parsed.parent_id().unwrap(), Some(7));
    }
}

#[test]
fn refuses_unknown_invalid_flags_and_degrades_unknown_ro_flags() {
    let mut meta = BlobMeta::new(0x1_0000_0000, false, ExtentForm::Rle);
    meta.flags.invalid |= 1 << 7;
    let err = parse(&meta, &chain_pages(&meta, &[])).unwrap_err();
    assert_eq!(err.errno(), -libc::EINVAL);
    let mut meta = BlobMeta::new(0x1_0000_0000, false, ExtentForm::Rle);
    meta.flags.data_ro = 1 << 5;
    let parsed = parse(&meta, &chain_pages(&meta, &[])).unwrap();
    assert!(parsed.data_ro() && parsed.md_ro());
    let mut meta = BlobMeta::new(0x1_0000_0000, false, ExtentForm::Rle);
    meta.flags.md_ro = 1 << 9;
    let parsed = parse(&meta, &chain_pages(&meta, &[])).unwrap();
    assert!(!parsed.data_ro() && parsed.md_ro());
    assert_eq!(parsed.flags.md_ro, 1 << 9, "unknown bits are kept");
}

#[test]
fn refuses_wrong_ids_sequences_and_crcs() {
    let meta = BlobMeta::new(0x1_0000_0002, false, ExtentForm::Rle);
    let pages = chain_pages(&meta, &[]);
    let refs: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    assert_eq!(
        parse_chain(0x1_0000_0003, &refs, &AnyCluster)
            .unwrap_err()
            .errno(),
        -libc::ENOENT
    );
    let mut bad = pages[0].clone();
    bad[100] ^= 1;
    assert_eq!(
        parse_chain(meta.id, &[&bad], &AnyCluster)
            .unwrap_err()
            .errno(),
        -libc::EINVAL
    );
    let second = encode_page(meta.id, 5, INVALID_MD_PAGE, &[]);
    assert_eq!(
        parse_chain(meta.id, &[&pages[0], &second], &AnyCluster)
            .unwrap_err()
            .errno(),
        -libc::EINVAL
    );
}

#[test]
fn oversize_xattrs_are_refused_when_set() {
    let mut meta = BlobMeta::new(0x1_0000_0000, false, ExtentForm::Table);
    assert!(meta
        .set_xattr(false, b"k", &vec![0; MAX_XATTR_BYTES - 1])
        .is_ok());
    let err = meta
        .set_xattr(false, b"k", &vec![0; MAX_XATTR_BYTES])
        .unwrap_err();
    assert_eq!(err.errno(), -libc::EINVAL);
    let pages = chain_pages(&meta, &[9, 10]);
    assert_eq!(parse(&meta, &pages).unwrap(), meta);
}
