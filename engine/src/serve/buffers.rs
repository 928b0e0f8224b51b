//! A reactor's cache of DMA buffers for NBD requests: allocating from the global pool takes a
//! lock and may map memory, so the hot path takes a buffer of the right size class from here
//! and gives it back when the reply is sent. The cache is per reactor (no lock) and bounded.

use std::cell::RefCell;

use spool_bdev::dma::{DmaBuf, DmaError, DMA_ALIGN};

/// Size classes kept: 4 KiB (2^12) to 2 MiB (2^21); larger buffers are not cached.
const CLASS_MIN_SHIFT: u32 = 12;
const CLASS_MAX_SHIFT: u32 = 21;
/// Bytes the cache holds at most, over all classes (buffers beyond it are freed).
pub(crate) const CACHE_BYTES_MAX: usize = 64 << 20;

/// Free buffers by size class.
#[derive(Default)]
pub(crate) struct BufferCache {
    classes: RefCell<Vec<Vec<DmaBuf>>>,
    cached_bytes: std::cell::Cell<usize>,
}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(DMA_ALIGN).checked_next_power_of_two()?;
    let shift = size.trailing_zeros();
    (shift <= CLASS_MAX_SHIFT).then(|| (shift - CLASS_MIN_SHIFT) as usize)
}

impl BufferCache {
    /// A buffer of exactly `len > 0` bytes (contents unspecified).
    pub(crate) fn take(&self, len: usize) -> Result<DmaBuf, DmaError> {
        if let Some(class) = class_of(len) {
            let cached = self.classes.borrow_mut().get_mut(class).and_then(Vec::pop);
            if let Some(mut buf) = cached {
                self.cached_bytes
                    .set(self.cached_bytes.get().saturating_sub(buf.capacity()));
                buf.set_len(len)?;
                return Ok(buf);
            }
            // Allocate the whole class so the buffer can serve any length of it later.
            let mut buf = DmaBuf::alloc(1 << (class as u32 + CLASS_MIN_SHIFT))?;
            buf.set_len(len)?;
            return Ok(buf);
        }
        DmaBuf::alloc(len)
    }

    /// Gives `buf` back for reuse (freed instead when the cache is full or it is oversized).
    pub(crate) fn give(&self, buf: DmaBuf) {
        let Some(class) = class_of(buf.capacity()) else {
            return;
        };
        if buf.capacity() != 1 << (class as u32 + CLASS_MIN_SHIFT)
            || self.cached_bytes.get() + buf.capacity() > CACHE_BYTES_MAX
        {
            return;
        }
        self.cached_bytes
            .set(self.cached_bytes.get() + buf.capacity());
        let mut classes = self.classes.borrow_mut();
        if classes.len() <= class {
            classes.resize_with(class + 1, Vec::new);
        }
        classes[class].push(buf);
    }

    /// Bytes held by cached buffers now.
    #[cfg(test)]
    pub(crate) fn cached_bytes(&self) -> usize {
        self.cached_bytes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class_and_the_cache_is_bounded() {
        let cache = BufferCache::default();
        let first = cache.take(5000).unwrap();
        assert_eq!(first.len(), 5000);
        assert_eq!(first.capacity(), 8192);
        let address = first.as_ptr();
        cache.give(first);
        assert_eq!(cache.cached_bytes(), 8192);
        let again = cache.take(8192).unwrap();
        assert_eq!(again.as_ptr(), address, "the cached buffer comes back");
        assert_eq!(again.len(), 8192);
        assert_eq!(cache.cached_bytes(), 0);
        let big = cache.take(3 << 20).unwrap();
        assert_eq!(big.len(), 3 << 20);
        cache.give(big);
        assert_eq!(cache.cached_bytes(), 0, "oversized buffers are not kept");
        for _ in 0..(CACHE_BYTES_MAX / (2 << 20)) + 4 {
            cache.give(DmaBuf::alloc(2 << 20).unwrap());
        }
        assert!(cache.cached_bytes() <= CACHE_BYTES_MAX);
    }
}
