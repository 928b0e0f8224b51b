//! Goal: the first SIGINT or SIGTERM is recorded, not fatal, and the first one wins; the exit
//! statuses are the shell's (130, 143). Its own test binary: the recorded stop is
//! process-wide, and every long loop of the engine checks it.

use spool_engine::signals::{install, request_stop, stop_requested, StopSignal};

#[test]
fn a_signal_is_recorded_not_fatal_and_the_first_one_wins() {
    install().unwrap();
    assert_eq!(stop_requested(), None);
    assert!(signal_hook::low_level::raise(libc::SIGTERM).is_ok());
    assert_eq!(stop_requested(), Some(StopSignal::Terminate));
    request_stop(StopSignal::Interrupt);
    assert_eq!(
        stop_requested(),
        Some(StopSignal::Terminate),
        "the first one wins"
    );
    assert_eq!(StopSignal::Terminate.exit_code(), 143);
    assert_eq!(StopSignal::Interrupt.exit_code(), 130);
}
