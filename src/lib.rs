//! echo-worker turns uploaded recordings into transcripts and AI analysis by running each file through a
//! pipeline: a DAG of stages declared in `pipelines/*.toml`, using builtin stage kinds and plugins declared in
//! `plugins/*.toml`.
//!
//! # Layout
//! - [`app`]: wiring from settings to store, fetcher and stage registry.
//! - [`config`]: settings from built-in defaults, `echo.toml` and the environment; secrets never printed.
//! - [`pipeline`]: pipeline files compiled into a checked DAG, with every error at `file:line:column`.
//! - [`plugin`]: plugin files, the declarative stage kinds (`prompt`, `command`, `http`).
//! - [`stage`]: the stage kinds and the builtin kinds' parameters.
//! - [`defaults`]: the shipped pipelines and plugins, embedded for running with no files around.
//! - [`catalog`]: the pipelines and plugins of a deployment, loaded together.
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
pub mod pipeline;
pub mod plugin;
pub mod schema;
pub mod source;
pub mod stage;
pub mod store;
pub mod units;
