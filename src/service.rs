//! `echo-worker worker`, `api` and `serve`: a worker, the REST API, or both in one process, on the configured
//! queue until SIGTERM or SIGINT. This is wiring (settings to queue, store, stage kinds, a running [`Worker`] and
//! the [`Application`]), so it speaks `anyhow`.
//!
//! `worker` and `api` need `REDIS_URL`: a worker on an in-process queue alone could never receive a job, and an
//! API alone could queue jobs that no worker would see. `serve` (the API and a worker in one process) falls
//! back to the in-process queue without it, and says that jobs will not survive a restart. Both refuse to start on invalid pipeline or plugin files
//! and then watch both folders: valid edits apply to the next jobs enqueued, invalid ones are refused and logged.
//! The first signal starts a graceful shutdown (`worker.shutdown_grace`), a second one ends the grace period.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiParts, Application};
use crate::app;
use crate::config::Settings;
use crate::engine::{Engine, StageRegistry};
use crate::job::checkpoint::MemoryCheckpoints;
use crate::queue::memory::MemoryQueue;
use crate::queue::redis::RedisQueue;
use crate::queue::{Queue, QueueError};
use crate::watcher::LiveCatalog;
use crate::worker::{Worker, WorkerOptions};

/// Which command runs the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `echo-worker worker`: Redis only.
    Worker,
    /// `echo-worker api`: the REST API alone, on Redis only.
    Api,
    /// `echo-worker serve`: the API and a worker, on Redis, or the in-process queue without `REDIS_URL`.
    Serve,
}

/// Runs a worker, the API, or both until a signal; exit code 0 after a clean shutdown.
///
/// # Errors
/// Anything that stops it from starting: no `REDIS_URL` for `worker` or `api`, invalid pipeline or plugin files,
/// an unusable store or setting, a port that cannot be bound.
pub async fn run(settings: &Settings, role: Role, pipelines: PathBuf, plugins: PathBuf) -> anyhow::Result<ExitCode> {
    let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(on_signals(shutdown.clone(), hurry.clone()));
    let queue: Arc<dyn Queue> = match (app::queue_options(settings), role) {
        (Some(options), _) => match connect(&options, settings, &shutdown).await? {
            Some(queue) => Arc::new(queue),
            None => return Ok(ExitCode::SUCCESS),
        },
        (None, Role::Worker) => anyhow::bail!(
            "no REDIS_URL: `echo-worker worker` takes jobs from the Redis queue that `enqueue` and the API write to; \
             set REDIS_URL to that Redis (a worker on an in-process queue alone would never receive a job), or run \
             `echo-worker serve` for everything in one process"
        ),
        (None, Role::Api) => anyhow::bail!(
            "no REDIS_URL: `echo-worker api` queues jobs for workers in other processes, through Redis; set \
             REDIS_URL to the workers' Redis, or run `echo-worker serve` for the API and a worker in one process"
        ),
        (None, Role::Serve) => {
            tracing::warn!(
                "no REDIS_URL: using the in-process queue; jobs will not survive a restart, and only this process can \
                 enqueue into it (set REDIS_URL for a durable queue shared by several workers)"
            );
            Arc::new(MemoryQueue::new(settings.queue.settings()))
        }
    };
    let catalog = LiveCatalog::load(&pipelines, &plugins)
        .with_context(|| format!("loading {} and {}", pipelines.display(), plugins.display()))?;
    if let Err(error) = catalog.watch() {
        tracing::warn!(%error, "pipeline and plugin files will not be reloaded on change");
    }
    let store = app::store(settings).await?;
    let callbacks = app::callbacks(settings)?;
    let api = match role {
        Role::Worker => None,
        Role::Api | Role::Serve => {
            let parts = ApiParts {
                queue: queue.clone(),
                store: store.clone(),
                catalog: catalog.clone(),
                callbacks: Some(callbacks.clone()),
            };
            let application = Application::build(settings, parts).await?;
            Some(tokio::spawn(application.run(shutdown.clone())))
        }
    };
    if role == Role::Api {
        shutdown.cancelled().await;
        if let Some(api) = api {
            api.await.context("the API task")??;
        }
        callbacks.finish(settings.worker.shutdown_grace.0).await;
        drop(catalog);
        return Ok(ExitCode::SUCCESS);
    }
    let kinds = app::kinds(settings, store.clone()).await?;
    // The registry and checkpoints given here are replaced for each job (its plugins, its checkpoints).
    let engine = Engine::new(StageRegistry::new(), Arc::new(MemoryCheckpoints::default()), settings.engine());
    let options = WorkerOptions {
        concurrency: settings.worker.concurrency.max(1) as usize,
        lease: settings.queue.settings().lease,
        shutdown_grace: settings.worker.shutdown_grace.0,
        pipelines_dir: pipelines,
        plugins_dir: plugins,
    };
    let worker = Worker::new(queue, store, engine, kinds, options).with_callbacks(callbacks.clone());
    let summary = worker.run(shutdown, hurry).await;
    callbacks.finish(settings.worker.shutdown_grace.0).await;
    if let Some(api) = api {
        api.await.context("the API task")??;
    }
    drop(catalog);
    tracing::debug!(?summary, "done");
    Ok(ExitCode::SUCCESS)
}

/// Connects to the Redis queue, waiting (with backoff, logged once) while Redis does not answer, so that a worker
/// started before Redis, or during its restart, comes up by itself. `None` when a signal came first.
async fn connect(
    options: &crate::queue::redis::RedisOptions,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<RedisQueue>> {
    let mut wait = Duration::from_millis(200);
    let mut told = false;
    loop {
        match RedisQueue::connect(options, settings.queue.settings()).await {
            Ok(queue) => {
                if told {
                    tracing::info!("Redis answers; starting");
                }
                return Ok(Some(queue));
            }
            Err(QueueError::Unavailable(message)) => {
                if !told {
                    tracing::warn!("the queue's Redis does not answer ({message}); waiting for it");
                    told = true;
                }
            }
            Err(error) => return Err(error).context("connecting to the queue"),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return Ok(None),
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// The first SIGTERM or SIGINT fires `shutdown`, the second `hurry`.
async fn on_signals(shutdown: CancellationToken, hurry: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot listen for SIGTERM and SIGINT; stop the worker with SIGKILL");
        return;
    };
    for token in [shutdown, hurry] {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        token.cancel();
    }
}
