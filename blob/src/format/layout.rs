//! Where `init` puts each region of a new store, as SPDK v24.01's init does.

use super::mask::mask_pages;
use super::PAGE_SIZE_U64;

/// The regions of a store, in pages from the start of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Total clusters (the device's whole clusters; a partial trailing cluster is unused).
    pub total_clusters: u64,
    /// Used-md-pages mask: first page and length.
    pub used_page_mask: (u32, u32),
    /// Used-clusters mask: first page and recorded length (room for growth may follow).
    pub used_cluster_mask: (u32, u32),
    /// Used-blob-ids mask: first page and length.
    pub used_blobid_mask: (u32, u32),
    /// First md page.
    pub md_start: u32,
    /// Md pages.
    pub md_len: u32,
    /// Clusters holding the super block, masks and md region (claimed at init).
    pub md_clusters: u64,
}

/// Why a layout cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The cluster size is not a non-zero multiple of 4096.
    #[error("cluster size {0} is not a non-zero multiple of 4096")]
    ClusterSize(u64),
    /// The device holds less than one cluster.
    #[error("device of {device_bytes} bytes is smaller than one cluster of {cluster_size}")]
    TooSmall {
        /// Device bytes.
        device_bytes: u64,
        /// Cluster bytes.
        cluster_size: u64,
    },
    /// The metadata needs more clusters than the device has.
    #[error("metadata needs {md_clusters} clusters, the device has {total_clusters}")]
    MetadataTooLarge {
        /// Clusters the metadata would take.
        md_clusters: u64,
        /// Clusters of the device.
        total_clusters: u64,
    },
    /// A count does not fit the on-disk 32-bit fields.
    #[error("{0}")]
    TooLarge(String),
}

impl Layout {
    /// The layout on a device of `device_bytes` with `cluster_size` clusters and `md_pages`
    /// metadata pages (`None`: one per cluster, the default).
    pub fn compute(
        device_bytes: u64,
        cluster_size: u64,
        md_pages: Option<u32>,
    ) -> Result<Layout, LayoutError> {
        if cluster_size == 0 || !cluster_size.is_multiple_of(PAGE_SIZE_U64) {
            return Err(LayoutError::ClusterSize(cluster_size));
        }
        if device_bytes < cluster_size {
            return Err(LayoutError::TooSmall {
                device_bytes,
                cluster_size,
            });
        }
        let total_clusters = device_bytes / cluster_size;
        if total_clusters > u64::from(u32::MAX) {
            return Err(LayoutError::TooLarge(format!(
                "{total_clusters} clusters do not fit 32-bit cluster indexes; use larger clusters"
            )));
        }
        let md_len = u64::from(md_pages.unwrap_or(total_clusters as u32));
        if md_len == 0 {
            return Err(LayoutError::TooLarge("0 metadata pages".into()));
        }
        let page_mask_len = mask_pages(md_len);
        let cluster_mask_len = mask_pages(total_clusters);
        // SPDK v24.01 reserves room for the cluster mask to grow to md_len bits.
        let cluster_mask_room = cluster_mask_len.max(mask_pages(md_len));
        let blobid_mask_len = mask_pages(md_len);
        let page_mask_start = 1u64;
        let cluster_mask_start = page_mask_start + page_mask_len;
        let blobid_mask_start = cluster_mask_start + cluster_mask_room;
        let md_start = blobid_mask_start + blobid_mask_len;
        let pages_per_cluster = cluster_size / PAGE_SIZE_U64;
        let md_clusters = (md_start + md_len).div_ceil(pages_per_cluster);
        if md_clusters > total_clusters {
            return Err(LayoutError::MetadataTooLarge {
                md_clusters,
                total_clusters,
            });
        }
        let fit = |value: u64| {
            u32::try_from(value)
                .map_err(|_| LayoutError::TooLarge(format!("{value} pages overflow 32 bits")))
        };
        Ok(Layout {
            total_clusters,
            used_page_mask: (fit(page_mask_start)?, fit(page_mask_len)?),
            used_cluster_mask: (fit(cluster_mask_start)?, fit(cluster_mask_len)?),
            used_blobid_mask: (fit(blobid_mask_start)?, fit(blobid_mask_len)?),
            md_start: fit(md_start)?,
            md_len: fit(md_len)?,
            md_clusters,
        })
    }
}

/// Clusters the metadata of a store occupies: `ceil((md_start + md_len) / pages_per_cluster)`.
pub fn md_clusters(md_start: u32, md_len: u32, cluster_size: u32) -> u64 {
    let pages_per_cluster = (u64::from(cluster_size) / PAGE_SIZE_U64).max(1);
    (u64::from(md_start) + u64::from(md_len)).div_ceil(pages_per_cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gib_default_matches_spdk() {
        let layout = Layout::compute(1 << 30, 1 << 20, None).unwrap();
        assert_eq!(layout.used_page_mask, (1, 1));
        assert_eq!(layout.used_cluster_mask, (2, 1));
        assert_eq!(layout.used_blobid_mask, (3, 1));
        assert_eq!(layout.md_start, 4);
        assert_eq!(layout.md_len, 1024);
        assert_eq!(layout.md_clusters, 5);
    }

    #[test]
    fn refuses_bad_geometry() {
        assert_eq!(
            Layout::compute(1 << 20, 2048, None),
            Err(LayoutError::ClusterSize(2048))
        );
        assert!(matches!(
            Layout::compute(1 << 19, 1 << 20, None),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Layout::compute(4 << 20, 1 << 20, Some(4096)),
            Err(LayoutError::MetadataTooLarge { .. })
        ));
    }
}
