//! Every bound the reactor keeps, with the reason for its value.

/// Messages handled per loop iteration. SPDK uses 8; we take more per pass because a message
/// here is a boxed closure that usually only spawns a task, and a larger batch amortises the
/// channel's atomic operations. Bounded so a flood of messages cannot starve the pollers.
pub const MSG_BATCH_MAX: usize = 64;

/// Runnable tasks polled per loop iteration. Tasks woken while this batch runs wait for the
/// next iteration, so pollers (and I/O completions) are never starved by a task that keeps
/// waking itself.
pub const TASK_BATCH_MAX: usize = 4096;

/// Timers fired per loop iteration; the rest fire on the next pass.
pub const TIMER_BATCH_MAX: usize = 1024;

/// How long an adaptive reactor spins with nothing to do before it sleeps in the kernel
/// (ns). A request that arrives within it is seen without a wake-up (a few microseconds on
/// this machine's VM); a reactor idle longer gives its core back. 50 µs covers the gap
/// between a client's back-to-back requests at queue depth 1 over loopback.
pub const ADAPTIVE_SPIN_NS: u64 = 50_000;

/// Reactors one runtime can run. Far above the cores of any machine we target; bounds the
/// per-thread wake table.
pub const REACTORS_MAX: usize = 256;

/// In idle mode, the longest a reactor sleeps on its message queue before looking again at
/// its pollers (which may have work a sleeping reactor cannot see, such as a ring's CQ).
pub const IDLE_SLEEP_NS_MAX: u64 = 1_000_000;

/// Rounds a stopping reactor spends cancelling tasks and draining what their drops woke.
/// One round normally suffices; more are needed only when destructors spawn or wake tasks.
pub const STOP_DRAIN_ROUNDS_MAX: usize = 16;

/// Steps a simulation runs before [`crate::Sim::run_until`] reports that it did not finish.
pub const SIM_STEPS_MAX: u64 = 100_000_000;

/// Largest virtual time a simulated step advances the clock by (ns): small enough that
/// latencies and timers interleave finely, large enough that runs finish quickly.
pub const SIM_STEP_NS_MAX: u64 = 200;

/// Idle passes (nothing done, I/O in flight) a busy reactor spins before it yields its core
/// once. About 1-2 µs of spinning: short next to a device's latency, long enough that a
/// completion arriving meanwhile is seen without a syscall.
pub const YIELD_AFTER_WAITING_PASSES: u32 = 16;
