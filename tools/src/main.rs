//! The `spool` command line.

fn main() {}
