//! Time for reactors: the TSC (through `quanta`) in production, a shared virtual clock in a
//! simulation. Every reactor call that needs "now" goes through here so a simulation can
//! replay exactly.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::OnceLock;

/// A source of nanoseconds since an arbitrary, fixed origin.
#[derive(Clone)]
pub(crate) enum Clock {
    /// Wall time read from the TSC, calibrated by quanta (about 10 ns a read).
    Real(quanta::Clock),
    /// Virtual time owned by a simulation; it moves only when the simulation moves it.
    Virtual(Rc<Cell<u64>>),
}

fn real_clock() -> &'static quanta::Clock {
    static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

fn real_origin() -> u64 {
    static ORIGIN: OnceLock<u64> = OnceLock::new();
    *ORIGIN.get_or_init(|| real_clock().raw())
}

impl Clock {
    /// The production clock shared by every reactor of the process.
    pub(crate) fn real() -> Clock {
        let _ = real_origin();
        Clock::Real(real_clock().clone())
    }

    /// Nanoseconds since the clock's origin.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(clock) => clock.delta_as_nanos(real_origin(), clock.raw()),
            Clock::Virtual(now) => now.get(),
        }
    }
}

/// Nanoseconds since a fixed origin, on the calling reactor's clock (virtual in a simulation);
/// off a reactor, the process's real clock.
#[inline]
pub fn now_ns() -> u64 {
    crate::context::with_current(|core| core.clock.now_ns())
        .unwrap_or_else(|| Clock::real().now_ns())
}
