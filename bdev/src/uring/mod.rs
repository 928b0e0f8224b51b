//! io_uring bdev.

pub mod sys;
