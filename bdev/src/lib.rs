//! Spool's block device layer.
//!
//! Table of contents:
//! - [`dma`]: DMA-able, 4 KiB-aligned buffers from a pool backed by 2 MiB hugepages when the
//!   machine has them, ordinary aligned memory when it has not.
//! - [`uring`]: the io_uring bdev (and its kernel edge in `uring::sys`).

pub mod dma;
pub mod uring;
