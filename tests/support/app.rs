//! `TestApp`: the whole API started on port 0 in this process, on the real Redis (a fresh key prefix per app)
//! or the memory queue, and on SQLite (a temporary file) or PostgreSQL (a fresh schema per app), with the
//! repository's pipelines and plugins, a storage root of its own, and optionally a worker in the same process.
//! Typed request methods return a [`Reply`] with the status, headers and JSON body. `stop` removes the app's
//! Redis keys and PostgreSQL schema.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use echo_worker::api::{ApiParts, Application};
use echo_worker::config::{SecretUrl, Settings};
use echo_worker::engine::{Engine, StageRegistry};
use echo_worker::job::checkpoint::MemoryCheckpoints;
use echo_worker::queue::Queue;
use echo_worker::queue::memory::MemoryQueue;
use echo_worker::queue::redis::{RedisOptions, RedisQueue};
use echo_worker::store::SqlStore;
use echo_worker::watcher::LiveCatalog;
use echo_worker::worker::{Worker, WorkerOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Which queue the app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// The in-process queue.
    Memory,
    /// The Redis at `ECHO_TEST_REDIS_URL`, under a fresh prefix.
    Redis,
}

/// Which store the app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file in the app's folder.
    Sqlite,
    /// The PostgreSQL at `ECHO_TEST_POSTGRES_URL`, in a fresh schema.
    Postgres,
}

/// A change to the settings before the app starts (given the app's folder).
type Adjust = Box<dyn FnOnce(&mut Settings, &Path)>;

/// How to start a [`TestApp`].
pub struct Builder {
    queue: QueueKind,
    store: StoreKind,
    worker: bool,
    adjust: Vec<Adjust>,
}

impl Builder {
    /// On the real Redis.
    pub fn redis(mut self) -> Self {
        self.queue = QueueKind::Redis;
        self
    }

    /// On PostgreSQL.
    pub fn postgres(mut self) -> Self {
        self.store = StoreKind::Postgres;
        self
    }

    /// With a worker in the same process.
    pub fn with_worker(mut self) -> Self {
        self.worker = true;
        self
    }

    /// Changes the settings before the app starts (the app's folder is given).
    pub fn settings(mut self, adjust: impl FnOnce(&mut Settings, &Path) + 'static) -> Self {
        self.adjust.push(Box::new(adjust));
        self
    }

    /// Starts the app.
    pub async fn start(self) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut settings = Settings::default();
        settings.server.host = "127.0.0.1".into();
        settings.server.port = 0;
        settings.paths.pipelines = root.join("pipelines");
        settings.paths.plugins = root.join("plugins");
        settings.paths.storage_root = dir.path().join("storage");
        settings.paths.temp_dir = dir.path().join("work");
        std::fs::create_dir_all(&settings.paths.storage_root).unwrap();
        std::fs::create_dir_all(&settings.paths.temp_dir).unwrap();
        settings.database.url = SecretUrl::new(format!("sqlite://{}", dir.path().join("echo.db").display()));
        settings.queue.lease = echo_worker::units::HumanDuration(Duration::from_secs(3));
        settings.worker.shutdown_grace = echo_worker::units::HumanDuration(Duration::from_secs(1));
        let mut schema = None;
        if self.store == StoreKind::Postgres {
            let name = format!("echo_test_api_{}", uuid::Uuid::new_v4().simple());
            settings.database.url = SecretUrl::new(super::postgres_url());
            settings.database.table = format!("{name}.recordings");
            schema = Some(name);
        }
        let mut prefix = None;
        if self.queue == QueueKind::Redis {
            let url = super::redis_url();
            super::redis_answers(&url).await.unwrap();
            let name = format!("echo-test-api-{}:", uuid::Uuid::new_v4().simple());
            settings.redis.url = Some(SecretUrl::new(url));
            settings.redis.prefix = name.clone();
            prefix = Some(name);
        }
        for adjust in self.adjust {
            adjust(&mut settings, dir.path());
        }
        let queue: Arc<dyn Queue> = match self.queue {
            QueueKind::Memory => Arc::new(MemoryQueue::new(settings.queue.settings())),
            QueueKind::Redis => {
                let url = settings.redis.url.clone().unwrap();
                let options = RedisOptions::new(&url, false, &settings.redis.prefix, &settings.queue.name);
                Arc::new(RedisQueue::connect(&options, settings.queue.settings()).await.unwrap())
            }
        };
        let store = echo_worker::app::store(&settings).await.unwrap();
        let catalog = LiveCatalog::load(&settings.paths.pipelines, &settings.paths.plugins).unwrap();
        let callbacks = echo_worker::app::callbacks(&settings).unwrap();
        let parts =
            ApiParts { queue: queue.clone(), store: store.clone(), catalog, callbacks: Some(callbacks.clone()) };
        let application = Application::build(&settings, parts).await.unwrap();
        let address = format!("http://{}", application.address());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(application.run(shutdown.clone()));
        let worker = if self.worker {
            let kinds = echo_worker::app::kinds(&settings, store.clone()).await.unwrap();
            let engine = Engine::new(StageRegistry::new(), Arc::new(MemoryCheckpoints::default()), settings.engine());
            let options = WorkerOptions {
                concurrency: 2,
                lease: settings.queue.settings().lease,
                shutdown_grace: settings.worker.shutdown_grace.0,
                pipelines_dir: settings.paths.pipelines.clone(),
                plugins_dir: settings.paths.plugins.clone(),
            };
            let worker = Worker::new(queue.clone(), store.clone(), engine, kinds, options).with_callbacks(callbacks);
            Some(tokio::spawn(worker.run(shutdown.clone(), CancellationToken::new())))
        } else {
            None
        };
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        TestApp { address, client, queue, store, settings, dir, shutdown, server, worker, prefix, schema }
    }
}

/// A running API.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    pub client: reqwest::Client,
    pub queue: Arc<dyn Queue>,
    pub store: Arc<SqlStore>,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<Result<(), echo_worker::api::StartError>>,
    worker: Option<tokio::task::JoinHandle<echo_worker::worker::WorkerSummary>>,
    prefix: Option<String>,
    schema: Option<String>,
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    /// Memory queue and SQLite, no worker.
    pub fn builder() -> Builder {
        Builder { queue: QueueKind::Memory, store: StoreKind::Sqlite, worker: false, adjust: Vec::new() }
    }

    /// Memory queue and SQLite, no worker.
    pub async fn spawn() -> Self {
        Self::builder().start().await
    }

    /// The storage root: local sources must be under it.
    pub fn storage(&self) -> PathBuf {
        self.settings.paths.storage_root.clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Sends a request and reads the reply.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("the API answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply { status, headers, body, text }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.send(self.client.post(self.url(path)).json(body)).await
    }

    /// A POST with a raw body and content type.
    pub async fn post_raw(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> Reply {
        self.send(self.client.post(self.url(path)).header("content-type", content_type).body(body)).await
    }

    /// A POST without a body.
    pub async fn post(&self, path: &str) -> Reply {
        self.send(self.client.post(self.url(path))).await
    }

    pub async fn health(&self) -> Reply {
        self.get("/health").await
    }

    pub async fn process_recording(&self, body: &Value) -> Reply {
        self.post_json("/api/process-recording", body).await
    }

    pub async fn batch_process(&self, body: &Value) -> Reply {
        self.post_json("/api/batch-process", body).await
    }

    pub async fn recording_status(&self, id: &str) -> Reply {
        self.get(&format!("/api/recording/{id}/status")).await
    }

    pub async fn job_status(&self, id: &str) -> Reply {
        self.get(&format!("/api/job/{id}/status")).await
    }

    pub async fn cancel_job(&self, id: &str) -> Reply {
        self.post(&format!("/api/job/{id}/cancel")).await
    }

    pub async fn retry_job(&self, id: &str) -> Reply {
        self.post(&format!("/api/job/{id}/retry")).await
    }

    pub async fn job_logs(&self, id: &str) -> Reply {
        self.get(&format!("/api/job/{id}/logs")).await
    }

    /// `GET /api/jobs?{query}`.
    pub async fn jobs(&self, query: &str) -> Reply {
        self.get(&format!("/api/jobs?{query}")).await
    }

    pub async fn queue_stats(&self) -> Reply {
        self.get("/api/queue/stats").await
    }

    pub async fn queue_clean(&self, body: &Value) -> Reply {
        self.post_json("/api/queue/clean", body).await
    }

    pub async fn queue_pause(&self) -> Reply {
        self.post("/api/queue/pause").await
    }

    pub async fn queue_resume(&self) -> Reply {
        self.post("/api/queue/resume").await
    }

    pub async fn retry_failed(&self, body: &Value) -> Reply {
        self.post_json("/api/queue/retry-failed", body).await
    }

    /// Waits (at most `limit`) until the job reaches a final state; returns its last status reply.
    pub async fn until_final(&self, job: &str, limit: Duration) -> Reply {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let reply = self.job_status(job).await;
            let state = reply.body["job"]["state"].as_str().unwrap_or("");
            if matches!(state, "completed" | "failed" | "cancelled") || tokio::time::Instant::now() >= deadline {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server and the worker, and removes the app's Redis keys and PostgreSQL schema.
    pub async fn stop(self) {
        self.shutdown.cancel();
        if let Some(worker) = self.worker {
            let _ = tokio::time::timeout(Duration::from_secs(10), worker).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
        if let Some(prefix) = &self.prefix {
            let client = redis::Client::open(super::redis_url()).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> =
                redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut connection).await.unwrap();
            if !keys.is_empty() {
                let _: () = redis::cmd("DEL").arg(keys).query_async(&mut connection).await.unwrap();
            }
        }
        if let Some(schema) = &self.schema {
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(self.store.pool()).await.unwrap();
        }
    }
}
