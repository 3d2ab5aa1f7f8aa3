//! The shipped pipelines and plugins, compiled into the binary, so that `echo-worker` works on a laptop with no
//! files around it: when neither the pipelines nor the plugins folder exists and neither was configured, the
//! embedded copies are unpacked into the temp dir and used. A test keeps this list equal to the folders.

use std::path::{Path, PathBuf};

/// Every shipped file, by its path in the repository.
pub const FILES: &[(&str, &str)] = &[
    ("pipelines/audio-qa.toml", include_str!("../pipelines/audio-qa.toml")),
    ("pipelines/default.toml", include_str!("../pipelines/default.toml")),
    ("pipelines/meeting.toml", include_str!("../pipelines/meeting.toml")),
    ("pipelines/podcast.toml", include_str!("../pipelines/podcast.toml")),
    ("pipelines/transcribe-only.toml", include_str!("../pipelines/transcribe-only.toml")),
    ("plugins/action-items.toml", include_str!("../plugins/action-items.toml")),
    ("plugins/chapters.toml", include_str!("../plugins/chapters.toml")),
    ("plugins/loudness.sh", include_str!("../plugins/loudness.sh")),
    ("plugins/loudness.toml", include_str!("../plugins/loudness.toml")),
    ("plugins/sentiment.toml", include_str!("../plugins/sentiment.toml")),
    ("plugins/show-notes.toml", include_str!("../plugins/show-notes.toml")),
    ("plugins/summary.toml", include_str!("../plugins/summary.toml")),
    ("plugins/webhook.toml", include_str!("../plugins/webhook.toml")),
];

/// Writes the embedded files under `root` (keeping files that are already identical) and returns the
/// pipelines and plugins folders.
///
/// # Errors
/// The I/O error and the path it happened on.
pub fn unpack(root: &Path) -> Result<(PathBuf, PathBuf), (PathBuf, std::io::Error)> {
    use std::os::unix::fs::PermissionsExt;
    for (name, text) in FILES {
        let path = root.join(name);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).map_err(|error| (folder.to_path_buf(), error))?;
        }
        if std::fs::read_to_string(&path).ok().as_deref() != Some(*text) {
            std::fs::write(&path, text).map_err(|error| (path.clone(), error))?;
        }
        if name.ends_with(".sh") {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|error| (path.clone(), error))?;
        }
    }
    Ok((root.join("pipelines"), root.join("plugins")))
}

/// Where the embedded files are unpacked: one folder per version, under the temp dir.
pub fn folder(temp_dir: &Path) -> PathBuf {
    temp_dir.join(format!("echo-worker-{}-defaults", env!("CARGO_PKG_VERSION")))
}
