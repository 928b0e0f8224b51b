//! The batched load against the straightforward one it replaced: the reference below reads
//! every md page of the image into a map and walks chains in it (the loader as it was
//! before the batched reads), and both must find the same masks, damaged blobs and graph
//! entries on a store with every kind of chain, then on thousands of corrupted copies of it
//! (pages rewritten, chains redirected, masks flipped), clean and dirty.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use spool_bdev::{Bdev, BdevDesc, MallocBdev};
use spool_reactor::{IdleMode, Runtime, RuntimeOptions};

use super::*;
use crate::blob::BlobOptions;
use crate::format::super_block::SuperBlock;
use crate::format::{read_u32 as get_u32, seal_page, write_u32, write_u64};
use crate::meta::{apply_extent_page, parse_chain, ExtentForm};
use crate::store::InitOptions;

const DEVICE_BYTES: u64 = 2 << 20;
const CLUSTER: u64 = 16 << 10;

fn runtime() -> Runtime {
    Runtime::start(&RuntimeOptions {
        cores: vec![0],
        idle: IdleMode::Sleep,
        pin: false,
    })
    .unwrap()
}

fn device(image: &[u8]) -> (Arc<MallocBdev>, BdevDesc) {
    let bdev = Arc::new(MallocBdev::from_image("load-test", 4096, image).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    (bdev, desc)
}

/// A cleanly unloaded store with one-page blobs, a blob of three chain pages, run-length
/// and extent-table blobs (two extent pages written), a snapshot and its clone, snapshot
/// markers, deleted blobs (zeroed pages) and an empty blob.
fn base_image(rt: &Runtime) -> Vec<u8> {
    let bdev = Arc::new(MallocBdev::new("base", 4096, DEVICE_BYTES / 4096).unwrap());
    let desc = BdevDesc::open(Arc::clone(&bdev) as Arc<dyn Bdev>).unwrap();
    rt.block_on(rt.reactors()[0], move || async move {
        let store = Blobstore::init(
            desc,
            &InitOptions {
                cluster_size: CLUSTER,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
        let create = |options: BlobOptions| {
            let store = store.clone();
            async move { store.create_blob(&options).await.unwrap() }
        };
        let mut doomed = Vec::new();
        for i in 0..12u64 {
            let id = create(BlobOptions {
                xattrs: vec![("name".into(), format!("blob{i}").into_bytes())],
                ..BlobOptions::default()
            })
            .await;
            if i % 4 == 1 {
                doomed.push(id);
            }
        }
        create(BlobOptions {
            xattrs: (0..60)
                .map(|i| (format!("xattr_{i:02}"), vec![b'a' + (i % 26) as u8; 150]))
                .collect(),
            num_clusters: 2,
            form: ExtentForm::Rle,
            ..BlobOptions::default()
        })
        .await;
        let thin = create(BlobOptions {
            num_clusters: 600,
            thin: true,
            ..BlobOptions::default()
        })
        .await;
        let blob = store.open_blob(thin).await.unwrap();
        let channel = store.channel().unwrap();
        let units = CLUSTER / store.io_unit_size();
        for cluster in [0u64, 550] {
            let mut buf = spool_bdev::DmaBuf::alloc(4096).unwrap();
            buf.fill(7);
            let (result, _) = channel.write(&blob.io(), cluster * units, buf).await;
            result.unwrap();
        }
        drop(channel);
        blob.close().await.unwrap();
        let origin = create(BlobOptions {
            num_clusters: 3,
            ..BlobOptions::default()
        })
        .await;
        let snapshot = store.create_snapshot(origin, &[]).await.unwrap();
        store.create_clone(snapshot, &[]).await.unwrap();
        for (name, value) in [
            (XATTR_SNAPSHOT_PENDING, origin),
            (XATTR_SNAPSHOT_REMOVING, snapshot),
        ] {
            create(BlobOptions {
                internal_xattrs: vec![(name.into(), value.to_le_bytes().to_vec())],
                ..BlobOptions::default()
            })
            .await;
        }
        create(BlobOptions {
            internal_xattrs: vec![("SNAP".into(), vec![1, 2, 3])],
            ..BlobOptions::default()
        })
        .await;
        create(BlobOptions {
            num_clusters: 4,
            form: ExtentForm::Rle,
            ..BlobOptions::default()
        })
        .await;
        for id in doomed {
            store.delete_blob(id).await.unwrap();
        }
        store.unload().await.unwrap();
    })
    .unwrap();
    bdev.snapshot()
}

// ---- The reference: the loader before the batched reads, over the whole image. ----

fn md_page<'a>(image: &'a [u8], block: &SuperBlock, page: u32) -> &'a [u8] {
    let at = (u64::from(block.md_start) + u64::from(page)) as usize * PAGE_SIZE;
    &image[at..at + PAGE_SIZE]
}

/// Every md page with a good CRC and a non-zero id (only those `only` marks, if given).
fn reference_pages(
    image: &[u8],
    block: &SuperBlock,
    only: Option<&BitSet>,
) -> HashMap<u32, Vec<u8>> {
    (0..block.md_len)
        .filter(|&page| only.is_none_or(|mask| mask.get(u64::from(page))))
        .filter_map(|page| {
            let bytes = md_page(image, block, page);
            let header = MdPageHeader::decode(bytes);
            (header.crc_ok && header.id != 0).then(|| (page, bytes.to_vec()))
        })
        .collect()
}

/// The chain of `root`; on failure, the pages walked (the failing one included) and why.
fn reference_walk(
    pages: &HashMap<u32, Vec<u8>>,
    root: u32,
    md_len: u32,
) -> std::result::Result<Vec<u32>, (Vec<u32>, BlobError)> {
    let mut chain = vec![root];
    let walked = reference_walk_into(pages, root, md_len, &mut chain);
    walked.map(|()| chain.clone()).map_err(|err| (chain, err))
}

/// The pages of `walked` a damaged chain keeps claimed: read, good CRC, `root`'s id.
fn reference_readable(pages: &HashMap<u32, Vec<u8>>, root: u32, walked: &[u32]) -> Vec<u32> {
    walked
        .iter()
        .copied()
        .filter(|page| {
            pages
                .get(page)
                .is_some_and(|bytes| MdPageHeader::decode(bytes).id == page_to_blobid(root))
        })
        .collect()
}

fn reference_walk_into(
    pages: &HashMap<u32, Vec<u8>>,
    root: u32,
    md_len: u32,
    chain: &mut Vec<u32>,
) -> Result<()> {
    let id = page_to_blobid(root);
    let mut seen = HashSet::from([root]);
    let mut current = root;
    loop {
        let page = pages.get(&current).ok_or_else(|| {
            BlobError::corrupt(
                id,
                format!("md page {current} of the chain is unreadable or has a bad CRC"),
            )
        })?;
        let header = MdPageHeader::decode(page);
        let sequence = chain.len() as u32 - 1;
        if header.id != id || header.sequence != sequence {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current} belongs to blob {:#x} at sequence {}, expected this blob at sequence {sequence}",
                    header.id, header.sequence
                ),
            ));
        }
        if header.next == INVALID_MD_PAGE {
            return Ok(());
        }
        if header.next >= md_len {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current}: next page {} is outside the md region",
                    header.next
                ),
            ));
        }
        if !seen.insert(header.next) {
            return Err(BlobError::corrupt(
                id,
                format!(
                    "md page {current}: the chain loops back to page {}",
                    header.next
                ),
            ));
        }
        chain.push(header.next);
        current = header.next;
    }
}

/// What a load found, comparable: masks, damaged blobs and graph entries as text.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    used_md_pages: Vec<u64>,
    used_clusters: Vec<u64>,
    used_blobids: Vec<u64>,
    damaged: Vec<String>,
    graph: Vec<String>,
}

fn graph_text(root: u32, info: &Result<GraphInfo>) -> String {
    match info {
        Ok(info) => format!(
            "{root}: pending {:?} removing {:?} parent {:?}",
            info.pending,
            info.removing,
            info.parent.as_ref().map_err(ToString::to_string)
        ),
        Err(err) => format!("{root}: {err}"),
    }
}

impl Outcome {
    fn new(md_pages: &BitSet, clusters: &BitSet, blobids: &BitSet, mut found: Found) -> Outcome {
        found.damaged.append(&mut found.disagree);
        found.damaged.sort_by_key(|(root, _)| *root);
        found.graph.sort_by_key(|(root, _)| *root);
        Outcome {
            used_md_pages: md_pages.iter_set().collect(),
            used_clusters: clusters.iter_set().collect(),
            used_blobids: blobids.iter_set().collect(),
            damaged: found
                .damaged
                .iter()
                .map(|(root, err)| format!("{root}: {err}"))
                .collect(),
            graph: found
                .graph
                .iter()
                .map(|(root, info)| graph_text(*root, info))
                .collect(),
        }
    }
}

fn reference_check(image: &[u8], block: &SuperBlock) -> RangeCheck {
    RangeCheck {
        total_clusters: block.total_clusters(image.len() as u64),
        md_len: block.md_len,
    }
}

/// The clean load: every listed root read, its chain walked and parsed, what it uses
/// claimed in the masks (a zeroed root is a ghost: its bits dropped).
fn reference_clean(
    image: &[u8],
    block: &SuperBlock,
    masks: &mut (BitSet, BitSet, BitSet),
) -> Found {
    let (md_pages, clusters, blobids) = masks;
    let pages = reference_pages(image, block, None);
    let range = reference_check(image, block);
    let check = RunCheck {
        range: &range,
        runs: Default::default(),
    };
    let mut graph = GraphMasks {
        claimed: BitSet::new(md_pages.len()),
        md_pages,
        clusters,
    };
    let mut found = Found::default();
    for root in blobids.iter_set() {
        let root = root as u32;
        if md_page(image, block, root).iter().all(|&byte| byte == 0) {
            found.ghosts.push(root);
            continue;
        }
        match reference_walk(&pages, root, block.md_len) {
            Ok(chain) => {
                let refs: Vec<&[u8]> = chain.iter().map(|page| pages[page].as_slice()).collect();
                let id = page_to_blobid(root);
                let parsed = parse_chain(id, &refs, &check);
                let runs = check.take_runs();
                let mut missing = Missing::default();
                graph.claim_chain(
                    &mut missing,
                    chain.iter().copied(),
                    parsed.as_ref().ok(),
                    &runs,
                );
                let parsed = match parsed {
                    Ok(parsed) => parsed,
                    Err(err) => {
                        missing.report(&mut found, root);
                        found.graph(root, Err(err));
                        continue;
                    }
                };
                found.graph(root, Ok(GraphInfo::of(&parsed.meta)));
                // Its extent pages' clusters are claimed too.
                let blob = ExtentPageOf {
                    id,
                    num_clusters: parsed.num_clusters,
                    thin: parsed.meta.is_thin(),
                };
                let mut first_error = None;
                for &(index, page) in &parsed.pending_extent_pages {
                    let claimed = match pages.get(&page) {
                        Some(bytes) => visit_extent_page(
                            &blob,
                            index,
                            bytes,
                            &MdPageHeader::decode(bytes),
                            &range,
                            |_, cluster| {
                                if cluster != 0 {
                                    graph.claim_cluster(&mut missing, cluster);
                                }
                            },
                        ),
                        None => Err(BlobError::corrupt(
                            id,
                            format!(
                                "extent page {index} (md page {page}) is unreadable or has a bad CRC"
                            ),
                        )),
                    };
                    if let Err(err) = claimed {
                        first_error.get_or_insert(err);
                    }
                }
                match first_error {
                    Some(err) => found.damaged.push((root, err)),
                    None => missing.report(&mut found, root),
                }
            }
            Err((walked, err)) => {
                graph.claim_page(root);
                for page in reference_readable(&pages, root, &walked) {
                    graph.claim_page(page);
                }
                found.graph(root, Err(err));
            }
        }
    }
    graph.drop_ghosts(&found, blobids);
    found
}

/// The replay before: every valid page read, roots found, each blob claimed as far as it
/// could be read.
fn reference_replay(image: &[u8], block: &SuperBlock, geometry: &Geometry) -> Outcome {
    let pages = reference_pages(image, block, None);
    let check = reference_check(image, block);
    let md_len = u64::from(block.md_len);
    let mut used_md_pages = BitSet::new(md_len);
    let mut used_clusters = BitSet::new(geometry.total_clusters);
    let mut used_blobids = BitSet::new(md_len);
    for cluster in 0..geometry.md_clusters {
        used_clusters.set(cluster);
    }
    let mut roots: Vec<u32> = pages
        .iter()
        .filter(|(&number, page)| {
            let header = MdPageHeader::decode(page);
            header.sequence == 0 && header.id == page_to_blobid(number)
        })
        .map(|(&number, _)| number)
        .collect();
    roots.sort_unstable();
    let mut found = Found::default();
    for root in roots {
        used_blobids.set(u64::from(root));
        used_md_pages.set(u64::from(root));
        let chain = match reference_walk(&pages, root, block.md_len) {
            Ok(chain) => chain,
            Err((walked, err)) => {
                for page in reference_readable(&pages, root, &walked) {
                    used_md_pages.set(u64::from(page));
                }
                found.damaged.push((root, err));
                continue;
            }
        };
        for &page in &chain {
            used_md_pages.set(u64::from(page));
        }
        let refs: Vec<&[u8]> = chain.iter().map(|page| pages[page].as_slice()).collect();
        let mut parsed = match parse_chain(page_to_blobid(root), &refs, &check) {
            Ok(parsed) => parsed,
            Err(err) => {
                found.damaged.push((root, err));
                continue;
            }
        };
        found.graph(root, Ok(GraphInfo::of(&parsed.meta)));
        let mut first_error = None;
        for &(index, page) in &parsed.pending_extent_pages {
            let applied = match pages.get(&page) {
                Some(bytes) => apply_extent_page(&mut parsed.meta, index, bytes, &check),
                None => Err(BlobError::corrupt(
                    page_to_blobid(root),
                    format!("extent page {index} (md page {page}) is unreadable or has a bad CRC"),
                )),
            };
            match applied {
                Ok(()) => used_md_pages.set(u64::from(page)),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        for &cluster in &parsed.meta.clusters {
            if cluster != 0 {
                used_clusters.set(u64::from(cluster));
            }
        }
        if let Some(err) = first_error {
            found.damaged.push((root, err));
        }
    }
    Outcome::new(&used_md_pages, &used_clusters, &used_blobids, found)
}

// ---- Running the batched load's pieces on an image. ----

/// What the batched load finds on `image`: the replay when the super block says so, else
/// the masks and the graph (`None` when the super block or the masks are refused).
fn batched(rt: &Runtime, image: &[u8]) -> Option<Outcome> {
    let (_bdev, desc) = device(image);
    rt.block_on(rt.reactors()[0], move || async move {
        let channel = desc.channel().unwrap();
        let block = SuperBlock::decode(&read_page(&channel, 0).await.ok()?).ok()?;
        block
            .check_geometry(desc.size_bytes(), desc.block_size())
            .ok()?;
        let geometry = geometry_of(&block, desc.size_bytes());
        let check = RangeCheck {
            total_clusters: geometry.total_clusters,
            md_len: block.md_len,
        };
        if block.masks_trusted() {
            let (mut md_pages, mut clusters, mut blobids) =
                read_masks(&channel, &block, geometry.total_clusters)
                    .await
                    .ok()?;
            let mut masks = GraphMasks {
                claimed: BitSet::new(md_pages.len()),
                md_pages: &mut md_pages,
                clusters: &mut clusters,
            };
            let found = read_graph(&channel, &geometry, &check, &mut masks, &blobids)
                .await
                .unwrap();
            masks.drop_ghosts(&found, &mut blobids);
            Some(Outcome::new(&md_pages, &clusters, &blobids, found))
        } else {
            let replayed = replay(&channel, &geometry, &check, None).await.unwrap();
            Some(Outcome::new(
                &replayed.used_md_pages,
                &replayed.used_clusters,
                &replayed.used_blobids,
                replayed.found,
            ))
        }
    })
    .unwrap()
}

fn geometry_of(block: &SuperBlock, device_bytes: u64) -> Geometry {
    Geometry {
        cluster_size: u64::from(block.cluster_size),
        io_unit_size: u64::from(block.effective_io_unit()),
        block_size: 4096,
        md_start: u64::from(block.md_start),
        md_len: block.md_len,
        total_clusters: block.total_clusters(device_bytes),
        md_clusters: md_clusters(block.md_start, block.md_len, block.cluster_size),
        cluster_shift: None,
        io_unit_shift: None,
    }
}

/// The reference's view of `image` (as [`batched`]).
fn reference(image: &[u8]) -> Option<Outcome> {
    let block = SuperBlock::decode(&image[..PAGE_SIZE]).ok()?;
    block.check_geometry(image.len() as u64, 4096).ok()?;
    let geometry = geometry_of(&block, image.len() as u64);
    if !block.masks_trusted() {
        return Some(reference_replay(image, &block, &geometry));
    }
    let region = |start: u32, len: u32| {
        &image[start as usize * PAGE_SIZE..(start + len) as usize * PAGE_SIZE]
    };
    let md_bits = block.md_len;
    let clusters = geometry.total_clusters;
    let md_pages = decode_mask(
        MaskKind::UsedPages,
        region(block.used_page_mask_start, block.used_page_mask_len),
        md_bits,
    )
    .ok()?;
    let cluster_mask = decode_mask(
        MaskKind::UsedClusters,
        region(block.used_cluster_mask_start, block.used_cluster_mask_len),
        clusters as u32,
    )
    .ok()?;
    let blobids = decode_mask(
        MaskKind::UsedBlobIds,
        region(block.used_blobid_mask_start, block.used_blobid_mask_len),
        md_bits,
    )
    .ok()?;
    let mut masks = (
        BitSet::from_bytes(u64::from(md_bits), &md_pages),
        BitSet::from_bytes(clusters, &cluster_mask),
        BitSet::from_bytes(u64::from(md_bits), &blobids),
    );
    let found = reference_clean(image, &block, &mut masks);
    Some(Outcome::new(&masks.0, &masks.1, &masks.2, found))
}

// ---- Corruptions. ----

fn set_dirty(image: &mut [u8]) {
    write_u32(image, 16, 0);
    seal_page(&mut image[..PAGE_SIZE]);
}

/// Rewrites a few md pages (and sometimes a mask bit) of `image` the way damage and
/// interrupted writes do: another page's bytes, a redirected `next`, an owner or sequence
/// number changed, a byte flipped; resealed or not.
fn corrupt(image: &mut [u8], block: &SuperBlock, rng: &mut fastrand::Rng) {
    let md_len = block.md_len;
    let page_at = |page: u32| (block.md_start + page) as usize * PAGE_SIZE;
    // Pages in use are the interesting ones: pick from them most of the time.
    let used: Vec<u32> = (0..md_len)
        .filter(|&page| image[page_at(page)..page_at(page) + 8] != [0; 8])
        .collect();
    for _ in 0..rng.usize(1..=4) {
        let page = if used.is_empty() || rng.u8(..) < 40 {
            rng.u32(..md_len)
        } else {
            used[rng.usize(..used.len())]
        };
        let at = page_at(page);
        let other = if used.is_empty() {
            rng.u32(..md_len)
        } else {
            used[rng.usize(..used.len())]
        };
        match rng.u8(..8) {
            0 => {
                let from = page_at(other);
                image.copy_within(from..from + PAGE_SIZE, at);
            }
            1 => {
                let next = match rng.u8(..4) {
                    0 => INVALID_MD_PAGE,
                    1 => md_len + rng.u32(..3),
                    _ => other,
                };
                write_u32(image, at + NEXT_OFFSET, next);
            }
            2 => write_u64(image, at, page_to_blobid(other)),
            3 => write_u32(image, at + 8, rng.u32(..3)),
            4 => image[at..at + PAGE_SIZE].fill(0),
            5 => {
                let byte = at + 16 + rng.usize(..64);
                image[byte] = rng.u8(..);
            }
            6 => {
                // A mask bit flipped (clean loads read the masks).
                let (start, bits) = if rng.bool() {
                    (block.used_page_mask_start, md_len)
                } else {
                    (block.used_blobid_mask_start, md_len)
                };
                let bit = rng.u32(..bits);
                let byte = start as usize * PAGE_SIZE + 5 + (bit / 8) as usize;
                image[byte] ^= 1 << (bit % 8);
                continue;
            }
            _ => {
                // An extent table redirected: any u32 of the descriptor area to a page.
                let word = at + 16 + 4 * rng.usize(..32);
                write_u32(image, word, other);
            }
        }
        if rng.u8(..4) != 0 {
            seal_page(&mut image[at..at + PAGE_SIZE]);
        }
    }
}

#[test]
fn the_base_store_loads_the_same_clean_and_dirty_as_the_reference() {
    let rt = runtime();
    let image = base_image(&rt);
    let clean = batched(&rt, &image).expect("the base store loads");
    assert_eq!(Some(&clean), reference(&image).as_ref());
    // What the store holds, so the comparisons below compare something.
    assert!(clean.damaged.is_empty(), "{clean:?}");
    assert_eq!(clean.used_blobids.len(), 18, "{clean:?}");
    assert!(
        clean.used_md_pages.len() >= clean.used_blobids.len() + 4,
        "continuation and extent pages are in use: {clean:?}"
    );
    let graph = clean.graph.join("\n");
    assert!(graph.contains("parent Ok(Some("), "a clone: {graph}");
    assert!(
        graph.contains("pending Some("),
        "a pending snapshot: {graph}"
    );
    assert!(graph.contains("removing Some("), "a merge: {graph}");
    assert!(
        graph.contains("SNAP xattr is 3 bytes"),
        "a bad SNAP: {graph}"
    );
    let mut dirty = image.clone();
    set_dirty(&mut dirty);
    let replayed = batched(&rt, &dirty).expect("the dirty store loads");
    assert_eq!(Some(&replayed), reference(&dirty).as_ref());
    // The replay rebuilds the masks a clean unload wrote (and the graph the clean load read).
    assert_eq!(replayed.used_md_pages, clean.used_md_pages);
    assert_eq!(replayed.used_clusters, clean.used_clusters);
    assert_eq!(replayed.used_blobids, clean.used_blobids);
    assert_eq!(replayed.graph, clean.graph);
    rt.stop();
}

#[test]
fn corrupted_stores_load_the_same_as_the_reference() {
    let rt = runtime();
    let image = base_image(&rt);
    let block = SuperBlock::decode(&image[..PAGE_SIZE]).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5EED_10AD);
    let mut damaged_cases = 0;
    for case in 0..300 {
        let mut copy = image.clone();
        corrupt(&mut copy, &block, &mut rng);
        if case % 2 == 1 {
            set_dirty(&mut copy);
        }
        let expected = reference(&copy);
        let found = batched(&rt, &copy);
        assert_eq!(found, expected, "case {case}");
        if found.is_some_and(|outcome| {
            !outcome.damaged.is_empty() || outcome.graph.iter().any(|g| g.contains("corrupt"))
        }) {
            damaged_cases += 1;
        }
    }
    assert!(
        damaged_cases > 75,
        "the corruptions reach the chains: {damaged_cases} cases found a damaged blob"
    );
    rt.stop();
}

#[test]
fn a_long_chain_is_walked_in_rounds_to_its_end() {
    // A blob whose chain is 40 pages long, in reverse page order (each round of the walk
    // reads one page), and whose last page loops back: the walk must reach the loop.
    let rt = runtime();
    let mut image = base_image(&rt);
    let block = SuperBlock::decode(&image[..PAGE_SIZE]).unwrap();
    let root = block.md_len - 41;
    let id = page_to_blobid(root);
    let page_at = |page: u32| (block.md_start + page) as usize * PAGE_SIZE;
    let chain: Vec<u32> = std::iter::once(root)
        .chain((0..40).map(|step| block.md_len - 1 - step))
        .collect();
    for (sequence, window) in chain.windows(2).enumerate() {
        let bytes = crate::format::md_page::encode_page(id, sequence as u32, window[1], &[]);
        image[page_at(window[0])..page_at(window[0]) + PAGE_SIZE].copy_from_slice(&bytes);
    }
    let last = *chain.last().unwrap();
    let bytes = crate::format::md_page::encode_page(id, 40, chain[5], &[]);
    image[page_at(last)..page_at(last) + PAGE_SIZE].copy_from_slice(&bytes);
    set_dirty(&mut image);
    let found = batched(&rt, &image).unwrap();
    assert_eq!(Some(&found), reference(&image).as_ref());
    let expected = format!(
        "{root}: blob {id:#x}: corrupt metadata: md page {last}: the chain loops back to page {}",
        chain[5]
    );
    assert!(found.damaged.contains(&expected), "{:?}", found.damaged);
    // A chain that cannot be walked keeps the pages it could read claimed (the replay's
    // rule: nothing of a damaged blob is handed out while readable parts remain).
    for page in &chain {
        assert!(
            found.used_md_pages.contains(&u64::from(*page)),
            "page {page}"
        );
    }
    assert_eq!(get_u32(&image, page_at(last) + NEXT_OFFSET), chain[5]);
    rt.stop();
}

/// A read-only load writes nothing: a dirty store is replayed in memory (and stays dirty on
/// the device), a metadata change fails with -EROFS, blobs open and read, and the unload
/// leaves every byte as it was.
#[test]
fn a_read_only_load_writes_nothing() {
    let rt = runtime();
    let mut image = base_image(&rt);
    set_dirty(&mut image);
    let (bdev, desc) = device(&image);
    let (recovered, create, blobs) = rt
        .block_on(rt.reactors()[0], move || async move {
            let options = LoadOptions {
                read_only: true,
                ..LoadOptions::default()
            };
            let (store, report) = Blobstore::load(desc, &options).await.unwrap();
            let create = store.create_blob(&BlobOptions::default()).await;
            let ids = store.blob_ids();
            for &id in &ids {
                if let Ok(blob) = store.open_blob(id).await {
                    blob.close().await.unwrap();
                }
            }
            store.unload().await.unwrap();
            (report.recovered, create.map(|_| ()), ids.len())
        })
        .unwrap();
    rt.stop();
    assert!(recovered, "the dirty store was replayed");
    assert_eq!(create.unwrap_err().errno(), -libc::EROFS);
    assert!(blobs > 0);
    assert!(
        bdev.snapshot() == image,
        "the device is byte for byte as it was"
    );
}
