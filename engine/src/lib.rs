//! Engine: starts reactors, opens devices and stores, serves them. Grows with the daemon issue.
