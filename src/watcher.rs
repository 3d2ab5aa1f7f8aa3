//! The catalog kept current while a service runs: `serve` and `worker` watch `pipelines/` and `plugins/` (the
//! `notify` crate: inotify on Linux) and load both folders again after a change. A valid edit replaces the
//! catalog, so the next job enqueued carries the new files; an invalid one is refused with every problem logged
//! at `file:line:column`, and the last good catalog stays. Jobs already enqueued are never affected: they carry
//! their own definition (see `crate::definition`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use notify::Watcher as _;

use crate::catalog::Catalog;
use crate::document::{Diagnostic, LoadError};

/// Changes are gathered for this long before reloading, so that an editor's save (write, rename, chmod) or a
/// `cp` of several files is one reload, not a reload of a half-written file.
const SETTLE: Duration = Duration::from_millis(300);

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {source}", path.display())]
pub struct WatchError {
    /// The folder.
    pub path: PathBuf,
    /// What `notify` said.
    pub source: notify::Error,
}

/// How a reload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files were valid and are the catalog now.
    Applied,
    /// The files are invalid: every problem; the last good catalog stays.
    Refused(Vec<Diagnostic>),
    /// A folder could not be read (the message); the last good catalog stays.
    Unreadable(String),
}

/// The last good catalog of two folders, reloaded when they change.
pub struct LiveCatalog {
    pipelines: PathBuf,
    plugins: PathBuf,
    current: RwLock<Arc<Catalog>>,
    last: Mutex<Option<Reload>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for LiveCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCatalog").field("pipelines", &self.pipelines).field("plugins", &self.plugins).finish()
    }
}

impl LiveCatalog {
    /// Loads both folders; a service never starts on invalid files.
    ///
    /// # Errors
    /// [`LoadError`] with every problem.
    pub fn load(pipelines: &Path, plugins: &Path) -> Result<Arc<Self>, LoadError> {
        let catalog = Catalog::load(pipelines, plugins)?;
        Ok(Arc::new(Self {
            pipelines: pipelines.to_path_buf(),
            plugins: plugins.to_path_buf(),
            current: RwLock::new(Arc::new(catalog)),
            last: Mutex::new(None),
            watcher: Mutex::new(None),
        }))
    }

    /// The catalog now.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// How the last reload went (`None` before the first).
    pub fn last_reload(&self) -> Option<Reload> {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Loads both folders again: a valid catalog replaces the current one; an invalid one is refused, each problem
    /// logged as `file:line:column: message`.
    pub fn reload(&self) -> Reload {
        let outcome = match Catalog::load(&self.pipelines, &self.plugins) {
            Ok(catalog) => {
                tracing::info!(
                    pipelines = catalog.pipelines.len(),
                    plugins = catalog.plugins.len(),
                    "pipeline and plugin files changed: the next jobs enqueued run the new version"
                );
                *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(catalog);
                Reload::Applied
            }
            Err(LoadError::Invalid(problems)) => {
                tracing::error!(
                    problems = problems.len(),
                    "refused an invalid edit of the pipeline and plugin files; the last good version stays in use"
                );
                for problem in &problems {
                    tracing::error!("{problem}");
                }
                Reload::Refused(problems)
            }
            Err(error) => {
                let message = format!("{error:#}");
                tracing::error!("cannot reload the pipeline and plugin files ({message}); the last good version stays");
                Reload::Unreadable(message)
            }
        };
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome.clone());
        outcome
    }

    /// Starts watching both folders (needs a Tokio runtime). Watching lasts as long as this catalog.
    ///
    /// # Errors
    /// [`WatchError`] when a folder cannot be watched.
    pub fn watch(self: &Arc<Self>) -> Result<(), WatchError> {
        let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading (`Access`) changes nothing; everything else may have.
            if event.is_ok_and(|event| !matches!(event.kind, notify::EventKind::Access(_))) {
                let _ = changed.send(());
            }
        })
        .map_err(|source| WatchError { path: self.pipelines.clone(), source })?;
        for folder in [&self.pipelines, &self.plugins] {
            watcher
                .watch(folder, notify::RecursiveMode::NonRecursive)
                .map_err(|source| WatchError { path: folder.clone(), source })?;
        }
        *self.watcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(watcher);
        // The task holds the catalog weakly, so dropping the catalog (and its watcher) ends it.
        let live = Arc::downgrade(self);
        tokio::spawn(async move {
            while changes.recv().await.is_some() {
                // Gather the burst of events one save makes.
                loop {
                    match tokio::time::timeout(SETTLE, changes.recv()).await {
                        Ok(Some(())) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(live) = live.upgrade() else { return };
                // Loading reads files and compiles JSON Schemas: off the async threads.
                let _ = tokio::task::spawn_blocking(move || live.reload()).await;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_shipped(to: &Path) -> (PathBuf, PathBuf) {
        let (pipelines, plugins) = (to.join("pipelines"), to.join("plugins"));
        for (from, into) in [("pipelines", &pipelines), ("plugins", &plugins)] {
            std::fs::create_dir_all(into).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, into.join(path.file_name().unwrap())).unwrap();
            }
        }
        (pipelines, plugins)
    }

    /// Waits (at most 10 s) until `done` holds.
    async fn until(done: impl Fn() -> bool) -> bool {
        for _ in 0..200 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done()
    }

    #[tokio::test]
    async fn a_valid_edit_applies_and_an_invalid_one_is_refused_keeping_the_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let (pipelines, plugins) = copy_shipped(dir.path());
        let live = LiveCatalog::load(&pipelines, &plugins).unwrap();
        live.watch().unwrap();
        let description = |catalog: &Catalog| catalog.pipelines["audio-qa"].description.clone().unwrap_or_default();
        let original = std::fs::read_to_string(pipelines.join("audio-qa.toml")).unwrap();
        let old = description(&live.current());

        let edited = original.replacen(&old, "Edited while running", 1);
        assert_ne!(edited, original, "the test edits the description");
        std::fs::write(pipelines.join("audio-qa.toml"), &edited).unwrap();
        assert!(until(|| description(&live.current()) == "Edited while running").await, "the valid edit applied");
        assert_eq!(live.last_reload(), Some(Reload::Applied));

        std::fs::write(pipelines.join("audio-qa.toml"), format!("{edited}\n[stages.broken]\nuses = \"nothing\"\n"))
            .unwrap();
        std::fs::write(plugins.join("summary.toml"), "name = \"summary\"\nkind = \"prompt\"\nbogus = 1\n").unwrap();
        let refused_files = || match live.last_reload() {
            Some(Reload::Refused(problems)) => problems
                .iter()
                .map(|p| p.file.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect::<std::collections::BTreeSet<String>>(),
            _ => std::collections::BTreeSet::new(),
        };
        assert!(
            until(|| refused_files().len() == 2).await,
            "both invalid files were refused, each with its problems: {:?}",
            live.last_reload()
        );
        let Some(Reload::Refused(problems)) = live.last_reload() else { unreachable!() };
        assert!(refused_files().contains("audio-qa.toml") && refused_files().contains("summary.toml"));
        assert!(problems.iter().all(|problem| problem.line > 0 && problem.column > 0));
        let current = live.current();
        assert_eq!(description(&current), "Edited while running", "the last good version stays");
        assert!(current.plugins.contains_key("summary"));
        assert!(current.pipelines["audio-qa"].stage("broken").is_none());
    }
}
