//! Batched reads of the md region for a load: the pages a load wants, in runs of up to
//! 256 KiB (nearby pages joined into one read), several reads in flight, each handed to the
//! caller as soon as it completes (no copy, nothing kept); and a cache of single pages
//! fetched on demand (the continuation and extent pages of the few chains that need them).

use std::collections::{HashMap, VecDeque};

use spool_bdev::{BdevChannel, DmaBuf};

use super::md_io::MD_IO_MAX_BYTES;
use super::Geometry;
use crate::bitmap::BitSet;
use crate::error::Result;
use crate::format::md_page::MdPageHeader;
use crate::format::PAGE_SIZE;

/// Most pages one read carries (256 KiB). With [`READS_IN_FLIGHT`] reads that is 1 MiB of
/// buffers: they stay in the core's L2 cache between the device's copy and the CRC (1 MiB
/// reads measured 5-10 % more CPU per load from RAM), and come from the DMA pool's first
/// chunk.
pub(crate) const RUN_MAX_PAGES: u32 = 64;
const _: () = assert!(RUN_MAX_PAGES as usize * PAGE_SIZE <= MD_IO_MAX_BYTES);
/// Unwanted pages a read may carry to join two wanted pages into one request: below this
/// gap one larger request costs less than two (on a disk; from RAM both are copies).
pub(crate) const RUN_GAP_PAGES: u32 = 16;
/// Reads kept in flight: the device works on the next ones while the caller decodes one.
pub(crate) const READS_IN_FLIGHT: usize = 4;

/// Contiguous runs `(first page, page count)` covering the ascending `pages`: a run holds at
/// most [`RUN_MAX_PAGES`] pages and joins wanted pages at most [`RUN_GAP_PAGES`] apart.
pub(crate) fn runs(pages: impl IntoIterator<Item = u32>) -> impl Iterator<Item = (u32, u32)> {
    let mut pages = pages.into_iter().peekable();
    std::iter::from_fn(move || {
        let first = pages.next()?;
        let mut last = first;
        while let Some(&next) = pages.peek() {
            let gap_ok = u64::from(next) <= u64::from(last) + u64::from(RUN_GAP_PAGES) + 1;
            let fits = u64::from(next) < u64::from(first) + u64::from(RUN_MAX_PAGES);
            if !(gap_ok && fits && next > last) {
                break;
            }
            last = next;
            pages.next();
        }
        Some((first, last - first + 1))
    })
}

/// The runs covering the whole md region `0..md_len`, [`RUN_MAX_PAGES`] each.
pub(crate) fn whole_region(md_len: u32) -> impl Iterator<Item = (u32, u32)> {
    (0..md_len)
        .step_by(RUN_MAX_PAGES as usize)
        .map(move |first| (first, RUN_MAX_PAGES.min(md_len - first)))
}

/// Reads each run of md pages with up to [`READS_IN_FLIGHT`] reads in flight and calls
/// `visit(first page, bytes)` for each, in run order, as it completes. The first failed read
/// fails the whole scan (after the reads in flight have completed).
pub(crate) async fn read_runs(
    channel: &BdevChannel,
    geometry: &Geometry,
    runs: impl Iterator<Item = (u32, u32)>,
    mut visit: impl FnMut(u32, &[u8]),
) -> Result<()> {
    let mut runs = runs.peekable();
    let mut in_flight = VecDeque::with_capacity(READS_IN_FLIGHT);
    let mut failed = None;
    loop {
        while failed.is_none() && in_flight.len() < READS_IN_FLIGHT {
            let Some((first, count)) = runs.next() else {
                break;
            };
            match DmaBuf::alloc(count as usize * PAGE_SIZE) {
                Ok(buf) => {
                    in_flight.push_back((first, channel.read(buf, geometry.md_page_offset(first))))
                }
                Err(err) => failed = Some(err.into()),
            }
        }
        let Some((first, request)) = in_flight.pop_front() else {
            break;
        };
        let (result, buf) = request.await;
        match result {
            Ok(()) if failed.is_none() => visit(first, &buf[..]),
            Ok(()) => {}
            Err(err) => {
                failed.get_or_insert(err.into());
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// A page a load can use: its bytes and its decoded header (CRC checked once).
pub(crate) struct CachedPage {
    /// The page's header.
    pub(crate) header: MdPageHeader,
    /// The 4096 bytes.
    pub(crate) bytes: Box<[u8]>,
}

/// What a lookup in a [`PageCache`] found.
pub(crate) enum Lookup<'a> {
    /// The page, valid (good CRC, non-zero id, and in use when the cache has a mask).
    Page(&'a CachedPage),
    /// Read (or excluded by the mask): not a page a chain may use.
    Unusable,
    /// Not read yet: fetch it and ask again.
    NotRead,
}

/// Md pages read one by one on demand: a page is usable when its CRC is good, its id is not
/// zero and, when the cache has a mask (a clean load: the used-page mask), its bit is set.
pub(crate) struct PageCache<'m> {
    mask: Option<&'m BitSet>,
    pages: HashMap<u32, Option<CachedPage>>,
}

impl<'m> PageCache<'m> {
    /// An empty cache; `mask` limits the usable pages to those it marks.
    pub(crate) fn new(mask: Option<&'m BitSet>) -> PageCache<'m> {
        PageCache {
            mask,
            pages: HashMap::new(),
        }
    }

    /// Looks page `page` up.
    pub(crate) fn get(&self, page: u32) -> Lookup<'_> {
        match self.pages.get(&page) {
            Some(Some(cached)) => Lookup::Page(cached),
            Some(None) => Lookup::Unusable,
            None => Lookup::NotRead,
        }
    }

    /// Pages held now.
    pub(crate) fn len(&self) -> usize {
        self.pages.len()
    }

    /// Forgets every page.
    pub(crate) fn clear(&mut self) {
        self.pages.clear();
    }

    /// Reads `wanted` (any order, repeats allowed) in batched runs and keeps each page,
    /// usable or not. Pages outside the mask are not read.
    pub(crate) async fn fetch(
        &mut self,
        channel: &BdevChannel,
        geometry: &Geometry,
        mut wanted: Vec<u32>,
    ) -> Result<()> {
        wanted.sort_unstable();
        wanted.dedup();
        wanted.retain(|page| !self.pages.contains_key(page));
        let mask = self.mask;
        let excluded = |page: u32| mask.is_some_and(|mask| !mask.get(u64::from(page)));
        for &page in wanted.iter().filter(|&&page| excluded(page)) {
            self.pages.insert(page, None);
        }
        wanted.retain(|&page| !excluded(page));
        let pages = &mut self.pages;
        let mut next = wanted.iter().copied().peekable();
        read_runs(
            channel,
            geometry,
            runs(wanted.iter().copied()),
            |first, bytes| {
                let end = first + (bytes.len() / PAGE_SIZE) as u32;
                while let Some(page) = next.next_if(|&page| page < end) {
                    let at = (page - first) as usize * PAGE_SIZE;
                    let bytes = &bytes[at..at + PAGE_SIZE];
                    let header = MdPageHeader::decode(bytes);
                    let usable = header.crc_ok && header.id != 0;
                    pages.insert(
                        page,
                        usable.then(|| CachedPage {
                            header,
                            bytes: bytes.into(),
                        }),
                    );
                }
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_join_near_pages_and_stop_at_the_gap_and_the_size_limit() {
        let gap = RUN_GAP_PAGES;
        let pages = [0, 1, 2, 2 + gap + 1, 2 + gap + 1 + gap + 2, 1000];
        assert_eq!(
            runs(pages).collect::<Vec<_>>(),
            vec![(0, 3 + gap + 1), (2 + gap + 1 + gap + 2, 1), (1000, 1)]
        );
        // Every page wanted: runs of the largest size.
        let all = 0..(2 * RUN_MAX_PAGES + 5);
        assert_eq!(
            runs(all).collect::<Vec<_>>(),
            vec![
                (0, RUN_MAX_PAGES),
                (RUN_MAX_PAGES, RUN_MAX_PAGES),
                (2 * RUN_MAX_PAGES, 5)
            ]
        );
        assert_eq!(
            whole_region(2 * RUN_MAX_PAGES + 5).collect::<Vec<_>>(),
            vec![
                (0, RUN_MAX_PAGES),
                (RUN_MAX_PAGES, RUN_MAX_PAGES),
                (2 * RUN_MAX_PAGES, 5)
            ]
        );
        assert_eq!(runs(std::iter::empty()).count(), 0);
        assert_eq!(whole_region(0).count(), 0);
        // The last page of the region.
        assert_eq!(runs([u32::MAX]).collect::<Vec<_>>(), vec![(u32::MAX, 1)]);
    }
}
