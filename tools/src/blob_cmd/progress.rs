//! Progress bars for long transfers: shown on stderr only when it is a terminal and the
//! transfer is large, so scripts and tests see no bar.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Transfers below this many bytes get no bar.
pub const BAR_MIN_BYTES: u64 = 16 << 20;

/// A byte-counting bar of `total` bytes labelled `what`, or a hidden one (stderr is not a
/// terminal, or the transfer is small).
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    if total < BAR_MIN_BYTES || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
