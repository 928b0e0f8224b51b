//! Seed inputs: cut from real store images, the SPDK-written fixtures
//! (`shared/fixtures/spdk/*.img.gz`) and the stores Spool makes ([`crate::store::bases`]).
//!
//! From each image: its super block, its three mask regions, the descriptor area of every
//! non-zero md page, every blob's chain (with the extent pages it names, up to 4 pages) and
//! every extent page alone, each wrapped with the knobs its target expects.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::read::GzDecoder;

use spool_blob::format::md_page::{MdPageHeader, DESC_OFFSET};
use spool_blob::format::super_block::SuperBlock;
use spool_blob::format::{page_to_blobid, INVALID_MD_PAGE, PAGE_SIZE};
use spool_blob::meta::parse_chain;

use crate::mutate::StoreInput;
use crate::store::SPOOL_BASES;
use crate::targets::{Limits, MD_CHAIN_MAX_PAGES};
use crate::Shape;

/// Environment variable naming the fixtures folder (as the blobstore's tests use it).
pub const FIXTURES_DIR_ENV: &str = "SPOOL_FIXTURES_DIR";

/// `$SPOOL_FIXTURES_DIR`, or the repository's `fixtures/spdk`, or `../shared/fixtures/spdk`.
pub fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(FIXTURES_DIR_ENV) {
        if !dir.is_empty() {
            return PathBuf::from(dir);
        }
    }
    // The copy in the repository (fixtures/spdk), else the shared folder beside it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let in_repo = root.join("fixtures").join("spdk");
    let dir = if in_repo.is_dir() {
        in_repo
    } else {
        root.join("..").join("shared").join("fixtures").join("spdk")
    };
    dir.canonicalize().unwrap_or(dir)
}

static FIXTURES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();

/// The gunzipped fixture images (`NAME.img.gz`), sorted by name; empty when the folder is
/// missing (a warning is printed once). Read once per process.
pub fn fixture_images() -> &'static [(String, Vec<u8>)] {
    FIXTURES.get_or_init(|| {
        let dir = fixtures_dir();
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) => {
                eprintln!(
                    "spool-fuzz: no SPDK fixtures at {} ({err}); seeding from Spool-made stores only (set {FIXTURES_DIR_ENV})",
                    dir.display()
                );
                return found;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.to_string_lossy().ends_with(".img.gz"))
            .collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".img.gz").to_string())
                .unwrap_or_default();
            let mut image = Vec::new();
            let read = std::fs::File::open(&path)
                .and_then(|file| GzDecoder::new(file).read_to_end(&mut image));
            match read {
                Ok(_) if image.len() >= PAGE_SIZE && image.len() % PAGE_SIZE == 0 => {
                    found.push((name, image));
                }
                Ok(_) => eprintln!("spool-fuzz: {} is not a whole number of pages", path.display()),
                Err(err) => eprintln!("spool-fuzz: cannot read {}: {err}", path.display()),
            }
        }
        found
    })
}

fn page(image: &[u8], index: usize) -> Option<&[u8]> {
    image.get(index * PAGE_SIZE..(index + 1) * PAGE_SIZE)
}

/// Seeds for a target of shape `shape`, from one image.
pub fn seeds_from_image(shape: Shape, image: &[u8], block_size: u32) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let Some(first) = page(image, 0) else {
        return seeds;
    };
    let Ok(block) = SuperBlock::decode(first) else {
        return seeds;
    };
    let device = image.len() as u64;
    let total_clusters = block.total_clusters(device) as u32;
    let md_start = block.md_start as usize;
    let md_len = block.md_len as usize;
    let md_page = |n: usize| page(image, md_start + n);
    let limits = Limits {
        total_clusters,
        md_len: block.md_len,
    };
    match shape {
        Shape::SuperBlock => {
            let selector = block_size.trailing_zeros().saturating_sub(9) as u8;
            for flags in [0u8, 1 | 4] {
                let mut seed = vec![flags];
                seed.extend_from_slice(&device.to_le_bytes());
                seed.push(selector);
                seed.extend_from_slice(first);
                seeds.push(seed);
            }
        }
        Shape::Mask => {
            for (selector, start, len, bits) in [
                (
                    0u8,
                    block.used_page_mask_start,
                    block.used_page_mask_len,
                    block.md_len,
                ),
                (
                    1,
                    block.used_cluster_mask_start,
                    block.used_cluster_mask_len,
                    total_clusters,
                ),
                (
                    2,
                    block.used_blobid_mask_start,
                    block.used_blobid_mask_len,
                    block.md_len,
                ),
            ] {
                let from = start as usize * PAGE_SIZE;
                let to = (from + len as usize * PAGE_SIZE).min(image.len());
                if len == 0 || from >= to {
                    continue;
                }
                for selector in [selector, selector | 0x80] {
                    let mut seed = vec![selector];
                    seed.extend_from_slice(&bits.to_le_bytes());
                    seed.extend_from_slice(&image[from..to]);
                    seeds.push(seed);
                }
            }
        }
        Shape::Descriptors => {
            for n in 0..md_len {
                if let Some(bytes) = md_page(n).filter(|p| p.iter().any(|&b| b != 0)) {
                    seeds.push(bytes[DESC_OFFSET..DESC_OFFSET + 4072].to_vec());
                }
            }
        }
        Shape::MdChain | Shape::ExtentPage => {
            for root in 0..md_len {
                let Some(bytes) = md_page(root) else { break };
                let header = MdPageHeader::decode(bytes);
                if !header.crc_ok
                    || header.sequence != 0
                    || header.id != page_to_blobid(root as u32)
                {
                    continue;
                }
                // Follow the chain (bounded, no loops).
                let mut chain = vec![root];
                let mut next = header.next;
                while next != INVALID_MD_PAGE
                    && (next as usize) < md_len
                    && !chain.contains(&(next as usize))
                    && chain.len() < 64
                {
                    chain.push(next as usize);
                    next = md_page(next as usize)
                        .map_or(INVALID_MD_PAGE, |p| MdPageHeader::decode(p).next);
                }
                let pages: Vec<&[u8]> = chain.iter().filter_map(|&n| md_page(n)).collect();
                let Ok(parsed) = parse_chain(header.id, &pages, &limits) else {
                    continue;
                };
                if shape == Shape::MdChain {
                    let used: Vec<&[u8]> = pages.iter().take(MD_CHAIN_MAX_PAGES).copied().collect();
                    let mut all = used.clone();
                    for &(_, extent) in &parsed.pending_extent_pages {
                        if all.len() >= MD_CHAIN_MAX_PAGES {
                            break;
                        }
                        if let Some(p) = md_page(extent as usize) {
                            all.push(p);
                        }
                    }
                    for reseal in [0x3C, 0] {
                        let layout = (used.len() - 1) as u8 | reseal | 0x40;
                        let mut seed = vec![layout];
                        seed.extend_from_slice(&header.id.to_le_bytes());
                        seed.extend_from_slice(&total_clusters.to_le_bytes());
                        seed.extend_from_slice(&block.md_len.to_le_bytes());
                        for p in &all {
                            seed.extend_from_slice(p);
                        }
                        seeds.push(seed);
                    }
                } else {
                    for &(index, extent) in &parsed.pending_extent_pages {
                        let (Some(p), Ok(index)) = (md_page(extent as usize), u8::try_from(index))
                        else {
                            continue;
                        };
                        let clusters = parsed.meta.clusters.len().min(2048) as u16;
                        let flags = u8::from(parsed.meta.is_thin()) | 2;
                        let mut seed = vec![flags];
                        seed.extend_from_slice(&clusters.to_le_bytes());
                        seed.push(index);
                        seed.extend_from_slice(&total_clusters.to_le_bytes());
                        seed.extend_from_slice(p);
                        seeds.push(seed);
                    }
                }
            }
        }
        Shape::Store | Shape::NbdHandshake | Shape::NbdRequest | Shape::RpcRequest => {}
    }
    seeds
}

fn store_seed(base: usize, flags: u8) -> Vec<u8> {
    StoreInput {
        base: base as u8,
        flags,
        patches: Vec::new(),
    }
    .encode()
}

/// Every seed for a target of shape `shape`: scripted clients for the NBD and RPC shapes, else from
/// the store bases (Spool-made and SPDK
/// fixtures), or from the fixtures alone if the bases cannot be built; deduplicated.
pub fn seeds(shape: Shape) -> Vec<Vec<u8>> {
    // The protocol targets are seeded by scripted clients, not images.
    match shape {
        Shape::NbdHandshake => return crate::nbd::handshake_seeds(),
        Shape::NbdRequest => return crate::nbd::request_seeds(),
        Shape::RpcRequest => return crate::rpc::request_seeds(),
        _ => {}
    }
    let mut seeds = Vec::new();
    match crate::store::bases() {
        Ok(bases) => {
            if shape == Shape::Store {
                // Flag-major, the small Spool-made bases first: a short run covers a clean
                // and a recovery load of every base before anything slower.
                let spool = SPOOL_BASES.min(bases.len());
                for flags in [0u8, 0x03, 0x40, 0x24, 0x07, 0x80] {
                    for base in 0..spool {
                        seeds.push(store_seed(base, flags));
                    }
                }
                for flags in [0u8, 0x03] {
                    for base in spool..bases.len() {
                        seeds.push(store_seed(base, flags));
                    }
                }
            }
            for base in bases {
                seeds.extend(seeds_from_image(shape, &base.image, base.block_size));
            }
        }
        Err(err) => {
            eprintln!("spool-fuzz: no Spool-made base images ({err}); seeding from fixtures");
            for (_, image) in fixture_images() {
                seeds.extend(seeds_from_image(shape, image, 4096));
            }
        }
    }
    let mut unique = std::collections::HashSet::new();
    seeds.retain(|seed| unique.insert(seed.clone()));
    seeds
}
