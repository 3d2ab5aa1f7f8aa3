//! A job's private work directory under the configured temp dir, made when a stage first asks for it (most
//! stages, a prompt or an HTTP call, never write a file, and a job that never asks costs no directory) and
//! removed when the job ends, whatever the outcome: the owner removes it on drop, so even a cancelled or
//! panicking run leaves nothing behind.
//!
//! The temp dir is usually shared with other users, so the directory is created fresh (never reused: creating it
//! fails if something is already there) with a random name and mode 0700: no one else can guess it, plant files
//! in it or read what a stage leaves there.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A job's work directory: its path is fixed at once, the directory is made by [`WorkDir::ensure`], and
/// removed on drop when this made it.
#[derive(Debug)]
pub struct WorkDir {
    root: PathBuf,
    path: PathBuf,
    /// Whether the directory is ours to remove: made by `ensure`, or handed over by the caller.
    made: Mutex<bool>,
    /// False for a directory the caller owns ([`WorkDir::existing`]): never removed here.
    owned: bool,
}

impl WorkDir {
    /// A work directory `root/echo-<job id>-<random>`, not made yet; characters outside `[A-Za-z0-9_-]` in the
    /// id become `_`.
    pub fn new(root: &Path, job_id: &str) -> Self {
        let safe: String = job_id
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let path = root.join(format!("echo-{safe}-{}", &random[..16]));
        Self { root: root.to_path_buf(), path, made: Mutex::new(false), owned: true }
    }

    /// Makes the directory at once (mode 0700; `root` too when missing).
    ///
    /// # Errors
    /// The I/O error when the directory cannot be created.
    pub fn create(root: &Path, job_id: &str) -> std::io::Result<Self> {
        let dir = Self::new(root, job_id);
        dir.ensure()?;
        Ok(dir)
    }

    /// A directory that exists and that the caller owns and removes (a test, a bench).
    pub fn existing(path: &Path) -> Self {
        Self { root: path.to_path_buf(), path: path.to_path_buf(), made: Mutex::new(true), owned: false }
    }

    /// The directory, made now if it was not yet (mode 0700, `root` too when missing).
    ///
    /// # Errors
    /// The I/O error when it cannot be made, naming the path; a directory already there that this did not make
    /// is refused, never used.
    pub fn ensure(&self) -> std::io::Result<&Path> {
        let mut made = self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*made {
            std::fs::create_dir_all(&self.root)?;
            std::fs::DirBuilder::new().mode(0o700).create(&self.path).map_err(|error| {
                std::io::Error::new(error.kind(), format!("creating work directory {}: {error}", self.path.display()))
            })?;
            *made = true;
        }
        Ok(&self.path)
    }

    /// Where the directory is (or will be once [`WorkDir::ensure`] made it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it exists (made here or handed over).
    pub fn is_made(&self) -> bool {
        *self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.owned || !self.is_made() {
            return;
        }
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

    #[test]
    fn a_work_dir_is_made_when_first_asked_for_and_never_over_something_planted() {
        let root = tempfile::tempdir().unwrap();
        let lazy = WorkDir::new(&root.path().join("deeper"), "job");
        assert!(!lazy.path().exists(), "nothing is made before a stage asks");
        let path = lazy.path().to_path_buf();
        drop(lazy);
        assert!(!path.exists() && !root.path().join("deeper").exists(), "dropping an unmade one touches nothing");

        let lazy = WorkDir::new(root.path(), "job");
        assert_eq!(lazy.ensure().unwrap(), lazy.path());
        assert_eq!(lazy.ensure().unwrap(), lazy.path(), "asking again reuses it");
        assert_eq!(std::fs::metadata(lazy.path()).unwrap().mode() & 0o777, 0o700);
        let path = lazy.path().to_path_buf();
        drop(lazy);
        assert!(!path.exists(), "removed on drop");

        let planted = WorkDir::new(root.path(), "job");
        std::fs::create_dir(planted.path()).unwrap();
        let error = planted.ensure().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
        assert!(error.to_string().contains(&planted.path().display().to_string()), "{error}");
        let path = planted.path().to_path_buf();
        drop(planted);
        assert!(path.exists(), "a directory it did not make is not its to remove");

        let theirs = WorkDir::existing(root.path());
        drop(theirs);
        assert!(root.path().exists(), "a caller's directory stays");
    }
}
