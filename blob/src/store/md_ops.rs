//! The metadata operations of a store running now, each as its own task (`crate::detach`):
//! `unload` and `destroy` wait for them, so a clean unload never writes its masks and clean
//! flag over an operation whose caller dropped its future half-way, and refuse new ones
//! while they write.
//!
//! The teardowns themselves (`unload`, `destroy`, an lvol store's `destroy` with both its
//! steps) run as tasks too, one at a time under the store's teardown lock: a teardown whose
//! caller went away still holds it, so the next one waits for it to end instead of writing
//! beside it.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use crate::error::{BlobError, Result};
use crate::store::{Blobstore, StoreInner};
use crate::sync::{LocalMutex, LocalMutexGuard};

/// How often `unload` looks again at the operations running.
const IDLE_POLL: Duration = Duration::from_micros(50);

/// How many times `unload` looks before refusing with -EBUSY (5 s at [`IDLE_POLL`]).
const IDLE_POLLS_MAX: u32 = 100_000;

/// A store's count of metadata operations running, and whether it takes new ones.
#[derive(Default)]
pub(crate) struct MdOps {
    running: Cell<usize>,
    closed: Cell<bool>,
    /// Held by the teardown running now (see the module doc).
    teardown: LocalMutex,
    /// Set once a destroy wiped the super block.
    pub(crate) destroyed: Cell<bool>,
}

/// One running operation, counted until its task drops this (when it finishes, or is
/// cancelled at stop).
pub(crate) struct MdOpRunning {
    store: Rc<StoreInner>,
}

impl Drop for MdOpRunning {
    fn drop(&mut self) {
        let running = &self.store.md_ops.running;
        running.set(running.get().saturating_sub(1));
    }
}

/// Refuses new metadata operations until dropped (an unload or destroy writing).
pub(crate) struct MdOpsClosed {
    store: Rc<StoreInner>,
}

impl Drop for MdOpsClosed {
    fn drop(&mut self) {
        self.store.md_ops.closed.set(false);
    }
}

impl Blobstore {
    /// Counts a public metadata operation as running until its task drops the returned
    /// guard (see `crate::detach::detached_op`). -EBUSY while an unload or destroy writes.
    pub(crate) fn begin_md_op(&self) -> Result<MdOpRunning> {
        if self.inner.md_ops.closed.get() {
            return Err(BlobError::Busy(
                "the store is being unloaded or destroyed".into(),
            ));
        }
        Ok(self.md_op_running())
    }

    /// Counts an internal metadata step (a persist, a delete) that a public operation (or
    /// unload itself) started, as running until the returned guard drops. Never refused.
    pub(crate) fn md_op_running(&self) -> MdOpRunning {
        let running = &self.inner.md_ops.running;
        running.set(running.get() + 1);
        MdOpRunning {
            store: Rc::clone(&self.inner),
        }
    }

    /// Waits until no other teardown (unload, destroy) of the store runs, and keeps the next
    /// one waiting until the returned guard drops. Taken by the teardown's own task, so a
    /// dropped caller does not release it half-way.
    pub(crate) async fn teardown(&self) -> LocalMutexGuard<'_> {
        self.inner.md_ops.teardown.lock().await
    }

    /// Waits until no metadata operation runs, then refuses new ones until the returned
    /// guard drops. -EBUSY if some still run after 5 s.
    pub(crate) async fn close_md_ops(&self, what: &str) -> Result<MdOpsClosed> {
        let md_ops = &self.inner.md_ops;
        let mut polls = 0u32;
        while md_ops.running.get() > 0 {
            if polls == IDLE_POLLS_MAX {
                return Err(BlobError::Busy(format!(
                    "{what}: {} metadata operation(s) still running",
                    md_ops.running.get()
                )));
            }
            spool_reactor::sleep(IDLE_POLL).await;
            polls += 1;
        }
        md_ops.closed.set(true);
        Ok(MdOpsClosed {
            store: Rc::clone(&self.inner),
        })
    }
}
