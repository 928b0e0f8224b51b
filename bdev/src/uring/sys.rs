//! Kernel edge of the io_uring bdev (being written).
