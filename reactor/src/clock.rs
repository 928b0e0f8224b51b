//! Time for reactors: the TSC (through `quanta`) in production, a shared virtual clock in a
//! simulation. Every reactor call that needs "now" goes through here so a simulation can
//! replay exactly.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::OnceLock;

/// A source of nanoseconds since an arbitrary, fixed origin.
#[derive(Clone)]
pub(crate) enum Clock {
    /// Wall time read from the TSC, calibrated by quanta (about 10 ns a read), with the
    /// process's origin.
    Real(quanta::Clock, u64),
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
        Clock::Real(real_clock().clone(), real_origin())
    }

    /// Nanoseconds since the clock's origin.
    #[inline]
    pub(crate) fn now_ns(&self) -> u64 {
        match self {
            Clock::Real(clock, origin) => clock.delta_as_nanos(*origin, clock.raw()),
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

/// The calling reactor's clock as a value a hot loop keeps: each [`ReactorClock::now_ns`] is
/// then a cycle-counter read (the TSC, through quanta) with no lookup of the current reactor,
/// unlike [`now_ns`]. In a simulation it reads the virtual clock, as `now_ns` does.
#[derive(Clone)]
pub struct ReactorClock(Clock);

impl ReactorClock {
    /// The calling reactor's clock; off a reactor, the process's real clock.
    pub fn current() -> ReactorClock {
        ReactorClock(
            crate::context::with_current(|core| core.clock.clone()).unwrap_or_else(Clock::real),
        )
    }

    /// Nanoseconds since the clock's origin (the same origin as [`now_ns`]).
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.0.now_ns()
    }
}

impl std::fmt::Debug for ReactorClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Clock::Real(..) => "real",
            Clock::Virtual(_) => "virtual",
        };
        f.debug_tuple("ReactorClock").field(&kind).finish()
    }
}
