//! DMA buffers (being written).
