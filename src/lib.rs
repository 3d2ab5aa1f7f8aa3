//! echo-worker turns uploaded recordings into transcripts and AI analysis by running each file through a
//! pipeline: a DAG of stages declared in `pipelines/*.toml`, using builtin stage kinds and plugins declared in
//! `plugins/*.toml`.
//!
//! # Layout
//! - [`config`]: settings from built-in defaults, `echo.toml` and the environment; secrets never printed.
//! - [`pipeline`]: pipeline files compiled into a checked DAG, with every error at `file:line:column`.
//! - [`plugin`]: plugin files, the declarative stage kinds (`prompt`, `command`, `http`).
//! - [`catalog`]: the pipelines and plugins of a deployment, loaded together.
//! - [`defaults`]: the shipped pipelines and plugins, embedded for running with no files around.
//! - [`stage`]: the `Stage` trait, the registry, and the builtin kinds (`validate` … `persist`).
//! - [`engine`]: runs one job's stage DAG: retries, timeouts, cancellation, checkpoints, progress.
//! - [`source`]: where media comes from, and the rules for reaching it (storage root, Supabase).
//! - [`net`]: the one checked HTTP client: internal addresses refused at resolution, redirects by hand.
//! - [`media`]: ffprobe and ffmpeg as child processes; [`child`]: process groups that die with their job.
//! - [`ai`]: the Azure / OpenAI-compatible client, request limits and structured replies.
//! - [`store`]: recordings, status and results in SQLite or PostgreSQL.
//! - [`app`]: wiring from settings to store, fetcher, providers and stage registry.
//! - [`local`]: `echo-worker process`, jobs run in this process.
//! - [`schema`]: the JSON Schemas of the pipeline and plugin files, generated from the Rust types.
//! - [`units`]: duration, size and bitrate literals shared by every file format.

pub mod ai;
pub mod app;
pub mod catalog;
pub mod child;
pub mod config;
pub mod defaults;
pub mod engine;
pub mod local;
pub mod media;
pub mod net;
pub mod pipeline;
pub mod plugin;
pub mod schema;
pub mod source;
pub mod stage;
pub mod store;
pub mod units;
