//! SIGINT, SIGTERM and SIGHUP as a request to stop cleanly, for long commands and the
//! daemon: the first one is recorded (work stops at its next request boundary, finishes what
//! is in flight, unloads the store cleanly, removes what it had half-made, and the process
//! exits 130, 143 or 129); a second one ends the process at once with that status, as fio
//! and bdevperf do. SIGHUP is the terminal hanging up (an ssh connection dropped): without a
//! handler it would kill the process mid-write and leave its temporary files behind.
//!
//! signal-hook installs the handlers (async-signal-safe: they only store into atomics);
//! [`stop_requested`] is one relaxed atomic load, cheap enough for a hot loop's check.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// A termination signal that asked for a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C): exit status 130.
    Interrupt,
    /// SIGTERM: exit status 143.
    Terminate,
    /// SIGHUP (the terminal hung up): exit status 129.
    Hangup,
}

impl StopSignal {
    /// The exit status a shell expects after this signal (128 + its number).
    pub fn exit_code(self) -> i32 {
        128 + self.number()
    }

    /// The signal's number.
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => libc::SIGINT,
            StopSignal::Terminate => libc::SIGTERM,
            StopSignal::Hangup => libc::SIGHUP,
        }
    }

    /// The signal's name ("SIGINT").
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Hangup => "SIGHUP",
        }
    }

    fn from_number(number: usize) -> Option<StopSignal> {
        match i32::try_from(number).ok()? {
            libc::SIGINT => Some(StopSignal::Interrupt),
            libc::SIGTERM => Some(StopSignal::Terminate),
            libc::SIGHUP => Some(StopSignal::Hangup),
            _ => None,
        }
    }
}

/// The first stop signal's number (0: none yet).
static REQUESTED: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

fn requested_cell() -> &'static Arc<AtomicUsize> {
    REQUESTED.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Installs the handlers (once per process; later calls do nothing). After it, the first
/// SIGINT, SIGTERM or SIGHUP is only recorded; the second of any ends the process with its
/// status.
pub fn install() -> std::io::Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    let seen = Arc::new(AtomicBool::new(false));
    // A hang-up ignored from the start is `nohup`'s request to outlive the terminal: left
    // ignored, so `nohup spool serve &` or a long export goes on after the ssh session ends.
    // SIGINT is caught even so (a job a script put in the background ignores it, and the
    // issue that asked for Ctrl-C found such a job could be stopped only by kill).
    let hangup = if ignored_at_start(libc::SIGHUP) {
        None
    } else {
        Some(libc::SIGHUP)
    };
    for signal in [Some(libc::SIGINT), Some(libc::SIGTERM), hangup]
        .into_iter()
        .flatten()
    {
        // Order matters: the shutdown check runs first, so it only fires on a second signal.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&seen))?;
        signal_hook::flag::register(signal, Arc::clone(&seen))?;
        signal_hook::flag::register_usize(signal, Arc::clone(requested_cell()), signal as usize)?;
    }
    // SIGXFSZ (a write past the file size limit, `ulimit -f`) would kill the process where
    // it stands, leaving temporary files and a dirty store: caught, it only makes that
    // write fail with EFBIG, which the command reports in words and cleans up after.
    signal_hook::flag::register(libc::SIGXFSZ, Arc::new(AtomicBool::new(false)))?;
    let _ = INSTALLED.set(());
    Ok(())
}

/// Whether `signal` was ignored when the process started (its bit in `SigIgn` of
/// `/proc/self/status`; false where that cannot be read). Asked before any handler is
/// installed.
fn ignored_at_start(signal: i32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| signal >= 1 && mask & (1 << (signal - 1)) != 0)
}

/// The signal that asked for a stop, if one did.
pub fn stop_requested() -> Option<StopSignal> {
    let number = REQUESTED.get()?.load(Ordering::Relaxed);
    StopSignal::from_number(number)
}

/// Asks for a stop as if `signal` had arrived (the RPC's `spdk_kill_instance`, tests).
pub fn request_stop(signal: StopSignal) {
    let _ = requested_cell().compare_exchange(
        0,
        signal.number() as usize,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
}
