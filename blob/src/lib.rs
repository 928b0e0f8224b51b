//! Placeholder: the blobstore arrives with its own issue.
