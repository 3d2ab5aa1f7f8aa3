//! The shipped pipelines and plugins, compiled into the binary, so that `echo-worker` works on a laptop with no
//! files around it: a folder that is neither configured nor there is replaced by its embedded copy. A test keeps
//! this list equal to the folders.
//!
//! The copies are unpacked into a fresh directory under the temp dir with a random name and mode 0700, so no other
//! user can plant, swap or link anything in it, and each file is checked against the embedded bytes (a regular
//! file, not a link, owned by this user, writable by no one else) before it is used. Nothing that was already on
//! disk is ever trusted. The directory is removed when the [`Unpacked`] value is dropped.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Every shipped file, by its path in the repository.
pub const FILES: &[(&str, &str)] = &[
    ("pipelines/audio-qa.toml", include_str!("../pipelines/audio-qa.toml")),
    ("pipelines/default.toml", include_str!("../pipelines/default.toml")),
    ("pipelines/meeting.toml", include_str!("../pipelines/meeting.toml")),
    ("pipelines/podcast.toml", include_str!("../pipelines/podcast.toml")),
    ("pipelines/soundscribe.toml", include_str!("../pipelines/soundscribe.toml")),
    ("pipelines/transcribe-only.toml", include_str!("../pipelines/transcribe-only.toml")),
    ("plugins/action-items.toml", include_str!("../plugins/action-items.toml")),
    ("plugins/chapters.toml", include_str!("../plugins/chapters.toml")),
    ("plugins/coaching.toml", include_str!("../plugins/coaching.toml")),
    ("plugins/loudness.sh", include_str!("../plugins/loudness.sh")),
    ("plugins/loudness.toml", include_str!("../plugins/loudness.toml")),
    ("plugins/sentiment.toml", include_str!("../plugins/sentiment.toml")),
    ("plugins/show-notes.toml", include_str!("../plugins/show-notes.toml")),
    ("plugins/summary.toml", include_str!("../plugins/summary.toml")),
    ("plugins/webhook.toml", include_str!("../plugins/webhook.toml")),
];

/// The folders the files live in, relative to the unpacked root.
const FOLDERS: [&str; 2] = ["pipelines", "plugins"];

/// Why the embedded files could not be unpacked or are no longer what was embedded.
#[derive(Debug, thiserror::Error)]
pub enum DefaultsError {
    /// Creating, writing or reading a file or folder failed.
    #[error("cannot unpack the embedded pipelines at {}: {error}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A path is a symbolic link, which an unpacked file or folder never is.
    #[error("{} is a symbolic link; the unpacked embedded pipelines are never links", path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A path is owned by someone else.
    #[error("{} belongs to user {owner}, not to this user ({expected})", path.display())]
    ForeignOwner {
        /// The path.
        path: PathBuf,
        /// Its owner's uid.
        owner: u32,
        /// This process's effective uid.
        expected: u32,
    },
    /// A path can be changed by other users.
    #[error("{} has mode {mode:03o}: other users could change it", path.display())]
    NotPrivate {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file's content differs from the embedded bytes, or it is not a regular file.
    #[error("{} differs from the embedded copy", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
    },
}

/// The embedded files unpacked into a private directory, removed on drop.
#[derive(Debug)]
pub struct Unpacked {
    dir: tempfile::TempDir,
}

impl Unpacked {
    /// The private directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The folder of the shipped pipelines.
    pub fn pipelines(&self) -> PathBuf {
        self.root().join("pipelines")
    }

    /// The folder of the shipped plugins.
    pub fn plugins(&self) -> PathBuf {
        self.root().join("plugins")
    }

    /// Checks that the directory is still private to this user and that every file is exactly the embedded one.
    ///
    /// # Errors
    /// The first path that is a link, belongs to someone else, can be changed by others or differs.
    pub fn verify(&self) -> Result<(), DefaultsError> {
        let root = self.root();
        let metadata = private(root)?;
        if !metadata.is_dir() || metadata.mode() & 0o077 != 0 {
            return Err(DefaultsError::NotPrivate { path: root.to_path_buf(), mode: metadata.mode() & 0o7777 });
        }
        for folder in FOLDERS {
            if !private(&root.join(folder))?.is_dir() {
                return Err(DefaultsError::Changed { path: root.join(folder) });
            }
        }
        for (name, text) in FILES {
            let path = root.join(name);
            let metadata = private(&path)?;
            let executable = !name.ends_with(".sh") || metadata.mode() & 0o100 != 0;
            if !metadata.is_file() || !executable {
                return Err(DefaultsError::Changed { path });
            }
            let content = std::fs::read(&path).map_err(|error| DefaultsError::Io { path: path.clone(), error })?;
            if content != text.as_bytes() {
                return Err(DefaultsError::Changed { path });
            }
        }
        Ok(())
    }
}

/// Writes the embedded files into a fresh directory under `temp_dir` (random name, mode 0700; created files
/// only, so nothing already on disk is reused) and verifies them.
///
/// # Errors
/// [`DefaultsError::Io`] with the path when a folder or file cannot be created; the errors of
/// [`Unpacked::verify`].
pub fn unpack(temp_dir: &Path) -> Result<Unpacked, DefaultsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| DefaultsError::Io { path, error }
    };
    std::fs::create_dir_all(temp_dir).map_err(io(temp_dir))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("echo-worker-{}-defaults-", env!("CARGO_PKG_VERSION")))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(temp_dir)
        .map_err(io(temp_dir))?;
    let unpacked = Unpacked { dir };
    for folder in FOLDERS {
        let path = unpacked.root().join(folder);
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(io(&path))?;
    }
    for (name, text) in FILES {
        let path = unpacked.root().join(name);
        let mode = if name.ends_with(".sh") { 0o700 } else { 0o600 };
        // `create_new` fails on anything already there, a symbolic link included.
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(io(&path))?;
        file.write_all(text.as_bytes()).map_err(io(&path))?;
    }
    unpacked.verify()?;
    Ok(unpacked)
}

/// The path's own metadata (links are not followed) when it is no link, owned by this user and writable by no one
/// else.
fn private(path: &Path) -> Result<std::fs::Metadata, DefaultsError> {
    let metadata =
        std::fs::symlink_metadata(path).map_err(|error| DefaultsError::Io { path: path.to_path_buf(), error })?;
    if metadata.file_type().is_symlink() {
        return Err(DefaultsError::Symlink { path: path.to_path_buf() });
    }
    let expected = nix::unistd::geteuid().as_raw();
    if metadata.uid() != expected {
        return Err(DefaultsError::ForeignOwner { path: path.to_path_buf(), owner: metadata.uid(), expected });
    }
    if metadata.mode() & 0o022 != 0 {
        return Err(DefaultsError::NotPrivate { path: path.to_path_buf(), mode: metadata.mode() & 0o7777 });
    }
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_unpack_into_a_fresh_private_directory_each_time() {
        let temp = tempfile::tempdir().unwrap();
        let first = unpack(temp.path()).unwrap();
        let second = unpack(temp.path()).unwrap();
        assert_ne!(first.root(), second.root(), "every unpack gets its own directory");
        for unpacked in [&first, &second] {
            let mode = std::fs::metadata(unpacked.root()).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", unpacked.root().display());
            let name = unpacked.root().file_name().unwrap().to_string_lossy().into_owned();
            let old = format!("echo-worker-{}-defaults", env!("CARGO_PKG_VERSION"));
            assert!(name.len() > old.len() + 1 && name.starts_with(&old), "a random suffix: {name}");
        }
        let root = first.root().to_path_buf();
        drop(first);
        assert!(!root.exists(), "removed on drop");
    }

    #[test]
    fn defaults_verify_refuses_a_changed_file_a_symlink_and_an_open_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let temp = tempfile::tempdir().unwrap();
        let unpacked = unpack(temp.path()).unwrap();
        let script = unpacked.plugins().join("loudness.sh");

        std::fs::write(&script, "#!/bin/sh\necho planted\n").unwrap();
        let error = unpacked.verify().unwrap_err();
        assert!(matches!(&error, DefaultsError::Changed { path } if *path == script), "{error}");

        std::fs::remove_file(&script).unwrap();
        let elsewhere = temp.path().join("elsewhere.sh");
        std::fs::write(&elsewhere, FILES.iter().find(|(name, _)| name.ends_with(".sh")).unwrap().1).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &script).unwrap();
        let error = unpacked.verify().unwrap_err();
        assert!(matches!(&error, DefaultsError::Symlink { path } if *path == script), "{error}");

        std::fs::remove_file(&script).unwrap();
        std::fs::copy(&elsewhere, &script).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = unpacked.verify().unwrap_err();
        assert!(matches!(&error, DefaultsError::NotPrivate { mode: 0o777, .. }), "{error}");

        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        unpacked.verify().expect("the embedded bytes again");
        std::fs::set_permissions(unpacked.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = unpacked.verify().unwrap_err();
        assert!(matches!(&error, DefaultsError::NotPrivate { mode: 0o755, .. }), "{error}");
    }

    #[test]
    fn defaults_verify_refuses_a_foreign_owner() {
        let temp = tempfile::tempdir().unwrap();
        let unpacked = unpack(temp.path()).unwrap();
        let file = unpacked.pipelines().join("audio-qa.toml");
        // Only root may give a file away; as anyone else the check is covered by the owner being ours.
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
            let error = unpacked.verify().unwrap_err();
            assert!(matches!(&error, DefaultsError::ForeignOwner { owner: 65534, .. }), "{error}");
        } else {
            assert_eq!(std::fs::metadata(&file).unwrap().uid(), nix::unistd::geteuid().as_raw());
        }
    }
}
