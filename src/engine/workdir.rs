//! A job's private work directory under the configured temp dir. It is removed when the job ends, whatever
//! the outcome: the guard removes it on drop, so even a cancelled or panicking run leaves nothing behind.
//!
//! The temp dir is usually shared with other users, so the directory is created fresh (never reused) with a
//! random name and mode 0700: no one else can guess it, plant files in it or read what a stage leaves there.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Owns a work directory and deletes it when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Creates `root/echo-<job id>-<random>` with mode 0700 (`root` too when missing); characters outside
    /// `[A-Za-z0-9_-]` in the id become `_`.
    ///
    /// # Errors
    /// The I/O error when the directory cannot be created.
    pub fn create(root: &Path, job_id: &str) -> std::io::Result<Self> {
        let safe: String = job_id
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        std::fs::create_dir_all(root)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("echo-{safe}-"))
            .rand_bytes(12)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(root)?;
        Ok(Self { path: dir.keep() })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn work_dirs_are_private_and_unpredictable() {
        let root = tempfile::tempdir().unwrap();
        let first = WorkDir::create(root.path(), "job/1").unwrap();
        let second = WorkDir::create(root.path(), "job/1").unwrap();
        assert_ne!(first.path(), second.path());
        for dir in [&first, &second] {
            assert_eq!(std::fs::metadata(dir.path()).unwrap().mode() & 0o777, 0o700, "{}", dir.path().display());
            let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
            let suffix = name.strip_prefix("echo-job_1-").unwrap_or_else(|| panic!("{name}"));
            assert!(!suffix.contains(&std::process::id().to_string()), "no pid in {name}");
            assert!(suffix.len() >= 12 && suffix.chars().all(|c| c.is_ascii_alphanumeric()), "random: {name}");
        }
        let path = first.path().to_path_buf();
        drop(first);
        assert!(!path.exists());
    }
}
