//! [`ClusterClaim`]: a data cluster a thin allocation claimed, given back on drop unless it
//! was handed over to the blob's cluster map.

use std::sync::Arc;

use super::StoreShared;

/// A claimed data cluster. Dropping the claim releases the cluster (every error path and every
/// drop of the work holding it); [`ClusterClaim::hand_over`] gives up that duty once the
/// cluster is in a blob's map (the metadata layer owns it from then on). `Send`: it travels
/// with the insert message to the metadata reactor.
pub(crate) struct ClusterClaim {
    store: Arc<StoreShared>,
    cluster: Option<u32>,
    zeroed: bool,
}

impl ClusterClaim {
    /// Claims a free data cluster (first fit); `None` when none is free.
    pub(crate) fn claim(store: &Arc<StoreShared>) -> Option<ClusterClaim> {
        let (cluster, zeroed) = store.claim_cluster_zeroed()?;
        store
            .claims_outstanding
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Some(ClusterClaim {
            store: Arc::clone(store),
            cluster: Some(cluster),
            zeroed,
        })
    }

    /// The claimed cluster.
    pub(crate) fn cluster(&self) -> u32 {
        self.cluster.unwrap_or(0)
    }

    /// Whether the cluster is known to read as zeros.
    pub(crate) fn zeroed(&self) -> bool {
        self.zeroed
    }

    /// The cluster now belongs to a blob's map: dropping no longer releases it.
    pub(crate) fn hand_over(mut self) -> u32 {
        self.cluster.take().unwrap_or(0)
    }
}

impl Drop for ClusterClaim {
    fn drop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            tracing::debug!(cluster, "releasing a claimed cluster that was not inserted");
            self.store.release_cluster(cluster);
        }
        self.store
            .claims_outstanding
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
