//! echo-worker turns uploaded recordings into transcripts and AI analysis by running each file through a
//! pipeline: a DAG of stages declared in `pipelines/*.toml`, using builtin stage kinds and plugins declared in
//! `plugins/*.toml`.
//!
//! # Layout
//! Listed from the bottom up: a module uses only modules listed above it (ARCHITECTURE.md; checked by
//! `tests/architecture.rs`).
//! - [`units`]: duration, size and bitrate literals; [`secret`]: credentials that never print;
//!   [`error`]: the error codes shared by stage errors, AI errors and job failures;
//!   [`child`]: process groups that die with their job; [`defaults`]: the shipped files, embedded;
//!   [`metrics`]: this process's Prometheus counters, rendered by `GET /metrics`.
//! - [`document`]: TOML with positions, every problem at `file:line:column`; [`template`]: minijinja;
//!   [`subtitle`]: SRT and WebVTT from timed transcript segments.
//! - [`job`]: the contract shared by engine, stages, store and queue (job spec, stage outputs and errors,
//!   checkpoints, progress); [`retry`]: retry policies and backoff.
//! - [`media`]: ffprobe and ffmpeg; [`source`]: where media comes from and the rules for reaching it;
//!   [`ai`]: the Azure / OpenAI-compatible client; [`store`]: recordings in SQLite or PostgreSQL.
//! - [`stage`]: the `Stage` trait and the builtin kinds; [`plugin`]: plugin files and the declarative kinds.
//! - [`pipeline`]: pipeline files compiled into a checked DAG; [`catalog`]: all of them loaded together;
//!   [`schema`]: the JSON Schemas of both formats.
//! - [`engine`]: runs one job's stage DAG: retries, timeouts, cancellation, checkpoints, progress.
//! - [`queue`]: jobs waiting and running across processes, with leases (Redis, or memory);
//!   [`definition`]: the pipeline and plugin files a job carries, made from the catalog and compiled back on a
//!   worker; [`watcher`]: the catalog reloaded when its folders change.
//! - [`callback`]: the signed POST to a job's `callbackUrl` when it ends, retried, under the address rules.
//! - [`worker`]: takes jobs from a queue and runs them through the engine, with leases, cancels and shutdown.
//! - [`net`]: the one checked HTTP client: internal addresses refused at resolution, redirects by hand.
//! - [`auth`]: who may call the API: service tokens (some read-only) and Supabase user JWTs.
//! - [`terminal`]: printing names and messages safely (control characters escaped, a closed stdout ends quietly).
//! - [`intake`]: a request to process a recording made into a queued job, for the CLI and the API alike.
//! - [`api`]: the REST API (axum): routes, errors as JSON, callers, CORS and rate limits, OpenAPI.
//! - [`config`]: settings; [`app`]: wiring from settings; [`local`]: `echo-worker process`; [`service`]:
//!   `worker` and `serve`; [`control`]: `enqueue` and the other queue commands.

pub mod ai;
pub mod api;
pub mod app;
pub mod auth;
pub mod bounded;
pub mod callback;
pub mod catalog;
pub mod child;
pub mod config;
pub mod control;
pub mod defaults;
pub mod definition;
pub mod document;
pub mod ending;
pub mod engine;
pub mod error;
pub mod intake;
pub mod job;
pub mod local;
pub mod media;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod plugin;
pub mod queue;
pub mod retry;
pub mod schema;
pub mod secret;
pub mod service;
pub mod source;
pub mod stage;
pub mod store;
pub mod subtitle;
pub mod template;
pub mod terminal;
pub mod time;
pub mod units;
pub mod watcher;
pub mod worker;
