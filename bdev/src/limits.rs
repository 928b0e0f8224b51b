//! Every bound the bdev layer keeps, with the reason for its value.

/// Requests one channel may have in flight. Pooled request slots grow up to this and are
/// then reused, so steady state allocates nothing per I/O. 4096 is far above any useful
/// queue depth for one device on one core (NVMe queues are 1024 deep).
pub const CHANNEL_IO_MAX: usize = 4096;

/// Largest number of iovecs in one vectored request (Linux's UIO_MAXIOV).
pub const IOVECS_MAX: usize = 1024;

/// Largest simulated device latency, ns: completions of simulated bdevs land between 0 and
/// this after submission, in an order drawn from the simulation seed.
pub const SIM_LATENCY_NS_MAX: u64 = 50_000;
