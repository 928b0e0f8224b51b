//! Step timings of a metadata operation, reported as one `debug` event when it ends (the
//! snapshot path's probe: where a call's time goes; see docs/performance.md).

/// Times the steps of one operation on the reactor's clock.
pub(crate) struct Steps {
    what: &'static str,
    started_ns: u64,
    last_ns: u64,
    steps: Vec<(&'static str, u64)>,
}

impl Steps {
    /// Starts timing `what`.
    pub(crate) fn start(what: &'static str) -> Steps {
        let now = spool_reactor::now_ns();
        Steps {
            what,
            started_ns: now,
            last_ns: now,
            steps: Vec::new(),
        }
    }

    /// Ends step `name` (it began where the previous one ended).
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = spool_reactor::now_ns();
        self.steps.push((name, now.saturating_sub(self.last_ns)));
        self.last_ns = now;
    }

    /// Microseconds since [`Steps::start`].
    pub(crate) fn total_us(&self) -> u64 {
        spool_reactor::now_ns().saturating_sub(self.started_ns) / 1000
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let steps: Vec<String> = self
                .steps
                .iter()
                .map(|(name, ns)| format!("{name}={}us", ns / 1000))
                .collect();
            tracing::debug!(op = self.what, total_us = self.total_us(), steps = %steps.join(" "), "step timings");
        }
    }
}
