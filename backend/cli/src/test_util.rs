//! What the unit tests of this crate share.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh path under the system temp dir (not created), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        TempDir(std::env::temp_dir().join(format!(
            "imn-{label}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            imn_proto::now_ms()
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
