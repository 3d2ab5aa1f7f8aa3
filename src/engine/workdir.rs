//! A job's private work directory under the configured temp dir. It is removed when the job ends, whatever
//! the outcome: the guard removes it on drop, so even a cancelled or panicking run leaves nothing behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes work directories of runs of the same job id within one process.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Owns a work directory and deletes it when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `root/echo-<job id>-<pid>-<n>`; characters outside `[A-Za-z0-9_-]` in the id become `_`.
    ///
    /// # Errors
    /// The I/O error when the directory cannot be created.
    pub fn create(root: &Path, job_id: &str) -> std::io::Result<Self> {
        let safe: String = job_id
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("echo-{safe}-{}-{sequence}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "could not remove a job's work directory");
        }
    }
}
