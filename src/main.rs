//! The `echo-worker` command line: a thin layer over the library that parses arguments, loads settings and
//! turns errors into exit codes (0 success, 1 failure or invalid files, 2 bad usage).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use echo_worker::catalog::Catalog;
use echo_worker::config::Settings;
use echo_worker::document::{Diagnostic, LoadError};
use echo_worker::pipeline::Pipeline;
use echo_worker::service::Role;
use echo_worker::{schema, terminal};
use serde_json::json;

/// Turns recordings into transcripts and AI analysis through TOML-declared stage pipelines.
#[derive(Debug, Parser)]
#[command(name = "echo-worker", version, about, propagate_version = true)]
struct Cli {
    /// Settings file to read instead of ./echo.toml (environment variables still win).
    #[arg(long, global = true, value_name = "FILE", env = "ECHO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check every pipeline and plugin file and list each pipeline's stages in order; exit 1 listing every
    /// problem if any file is invalid.
    Validate {
        #[command(flatten)]
        folders: Folders,
        /// Output for people or for tools.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a pipeline's stage DAG as Graphviz DOT or Mermaid.
    Graph {
        /// The pipeline's name (its file name without .toml).
        name: String,
        #[command(flatten)]
        folders: Folders,
        /// The graph language.
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
    },
    /// Write the JSON Schemas of pipeline and plugin files (for editor completion through `#:schema`) and the
    /// API's OpenAPI document (`openapi.json`).
    Schema {
        /// Folder to write pipeline.schema.json, plugin.schema.json and openapi.json into.
        #[arg(long, value_name = "DIR", default_value = "schema")]
        out: PathBuf,
    },
    /// Print the effective settings as TOML, with secrets redacted.
    Config,
    /// Run files through a pipeline in this process (no server, no queue), with a progress bar per file; print a
    /// summary per file (or the JSON reports); exit 1 if any job failed, 130 when cancelled with Ctrl-C or SIGTERM.
    Process {
        /// Media files to process.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The pipeline to run.
        #[arg(long, default_value = "default")]
        pipeline: String,
        /// A job parameter, `key=value` (repeatable); the value is read as JSON when it parses (`false`, `3`).
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = echo_worker::local::parse_param)]
        params: Vec<(String, serde_json::Value)>,
        /// Folder for one `<file stem>.json` report per file.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// `text`: a short summary per file on stdout; `json`: the reports on stdout (one object for one file,
        /// an array for several), in place of the summary.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        folders: Folders,
    },
    /// Run a worker on the Redis queue (REDIS_URL) until SIGTERM or SIGINT: WORKER_CONCURRENCY jobs at once; on
    /// the signal, running jobs get `worker.shutdown_grace` to finish, then are handed back to the queue.
    Worker {
        #[command(flatten)]
        folders: Folders,
    },
    /// Run the service: the REST API (on PORT, 3001) and a worker in one process; without REDIS_URL the queue
    /// is in-process and jobs do not survive a restart.
    Serve {
        #[command(flatten)]
        folders: Folders,
    },
    /// Run the REST API alone (on PORT, 3001), queuing jobs on the Redis queue (REDIS_URL) for workers elsewhere.
    Api {
        #[command(flatten)]
        folders: Folders,
    },
    /// Queue files, folders (their media files) or URLs for the workers; with --wait, follow them to the end and
    /// exit like `process` (0, 1 when any failed, 130 on Ctrl-C, which leaves the jobs running).
    Enqueue {
        /// Media files, folders of media files, or URLs.
        #[arg(required = true, value_name = "FILE_OR_URL_OR_DIR")]
        inputs: Vec<String>,
        /// The pipeline to run.
        #[arg(long)]
        pipeline: String,
        /// Lower runs sooner; jobs of one priority run in enqueue order.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// A job parameter, `key=value` (repeatable); the value is read as JSON when it parses.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = echo_worker::local::parse_param)]
        params: Vec<(String, serde_json::Value)>,
        /// Follow every job with a progress bar until it ends.
        #[arg(long)]
        wait: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        folders: Folders,
    },
    /// List jobs, in one state or in all of them.
    Jobs {
        /// waiting, delayed, active, completed, failed or cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<echo_worker::queue::JobState>,
        /// Jobs shown per state.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Show one job: its state, stages (state, attempts, duration) and log lines.
    Job {
        /// The job id.
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Cancel a job: a waiting or delayed one at once; a running one is stopped by its worker within 2 s.
    Cancel {
        /// The job id.
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Run a failed or cancelled job again from its checkpoints, or every failed job with --failed.
    Retry {
        /// The job id.
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        id: Option<String>,
        /// Retry every failed job (of --pipeline only, when given).
        #[arg(long)]
        failed: bool,
        /// With --failed: only this pipeline's jobs.
        #[arg(long, requires = "failed")]
        pipeline: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Stop workers from taking jobs (running ones finish); kept in Redis until `resume`.
    Pause {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Let workers take jobs again after `pause`.
    Resume {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Counts per state, live workers and completed/failed in the last hour.
    Stats {
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Remove ended jobs (with their checkpoints and logs) older than an age.
    Clean {
        /// completed, failed or cancelled.
        #[arg(long, value_parser = parse_state)]
        state: echo_worker::queue::JobState,
        /// Age, such as `7d` or `12h`.
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: std::time::Duration,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
}

fn parse_state(text: &str) -> Result<echo_worker::queue::JobState, String> {
    echo_worker::queue::JobState::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = echo_worker::queue::JobState::ALL.iter().map(|state| state.name()).collect();
        format!("unknown state `{text}` (known: {})", names.join(", "))
    })
}

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    echo_worker::units::HumanDuration::parse(text).map(|age| age.0).map_err(|error| error.to_string())
}

#[derive(Debug, clap::Args)]
struct Folders {
    /// Folder of pipeline files [default: the `paths.pipelines` setting, `pipelines`].
    #[arg(long, value_name = "DIR")]
    pipelines: Option<PathBuf>,
    /// Folder of plugin files [default: the `paths.plugins` setting, `plugins`].
    #[arg(long, value_name = "DIR")]
    plugins: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Lines for people.
    Text,
    /// One JSON document.
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum GraphFormat {
    /// Graphviz DOT.
    Dot,
    /// A Mermaid flowchart.
    Mermaid,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            terminal::eprintln(format_args!("error: {}", terminal::escape_lines(&format!("{error:#}"))));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref()).context("loading settings")?;
    init_tracing(&settings);
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    match cli.command {
        Command::Validate { folders, format } => validate(&settings, &folders, format),
        Command::Graph { name, folders, format } => graph(&settings, &folders, &name, format),
        Command::Schema { out } => {
            for path in schema::write(&out)
                .map_err(|(path, error)| anyhow::anyhow!("cannot write {}: {error}", path.display()))?
            {
                terminal::println(format_args!("wrote {}", path.display()))?;
            }
            let path = out.join(echo_worker::api::OPENAPI_FILE);
            std::fs::write(&path, echo_worker::api::openapi_text())
                .with_context(|| format!("cannot write {}", path.display()))?;
            terminal::println(format_args!("wrote {}", path.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config => {
            terminal::print(settings.to_toml())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Process { files, pipeline, params, out, format, folders: args } => {
            let located = folders(&settings, &args)?;
            let request = echo_worker::local::ProcessRequest {
                files,
                pipeline,
                params: params.into_iter().collect(),
                out,
                json: matches!(format, Format::Json),
                pipelines: located.pipelines.clone(),
                plugins: located.plugins.clone(),
            };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(echo_worker::local::process(&settings, request))
        }
        Command::Worker { folders: args } => serve(&settings, Role::Worker, &args),
        Command::Serve { folders: args } => serve(&settings, Role::Serve, &args),
        Command::Api { folders: args } => serve(&settings, Role::Api, &args),
        Command::Enqueue { inputs, pipeline, priority, params, wait, format, folders: args } => {
            let located = folders(&settings, &args)?;
            let request = echo_worker::control::EnqueueRequest {
                inputs,
                pipeline,
                priority,
                params: params.into_iter().collect(),
                wait,
                json: matches!(format, Format::Json),
                pipelines: located.pipelines.clone(),
                plugins: located.plugins.clone(),
            };
            runtime()?.block_on(echo_worker::control::enqueue(&settings, request))
        }
        Command::Jobs { state, limit, format } => {
            runtime()?.block_on(echo_worker::control::jobs(&settings, state, limit, json(format)))
        }
        Command::Job { id, format } => runtime()?.block_on(echo_worker::control::job(&settings, &id, json(format))),
        Command::Cancel { id, format } => {
            runtime()?.block_on(echo_worker::control::cancel(&settings, &id, json(format)))
        }
        Command::Retry { id, failed, pipeline, format } => runtime()?.block_on(echo_worker::control::retry(
            &settings,
            id.as_deref(),
            failed,
            pipeline.as_deref(),
            json(format),
        )),
        Command::Pause { format } => runtime()?.block_on(echo_worker::control::pause(&settings, true, json(format))),
        Command::Resume { format } => runtime()?.block_on(echo_worker::control::pause(&settings, false, json(format))),
        Command::Stats { format } => runtime()?.block_on(echo_worker::control::stats(&settings, json(format))),
        Command::Clean { state, older_than, format } => {
            runtime()?.block_on(echo_worker::control::clean(&settings, state, older_than, json(format)))
        }
    }
}

/// `worker` and `serve`; the embedded files, when used, live as long as the service.
fn serve(settings: &Settings, role: Role, args: &Folders) -> anyhow::Result<ExitCode> {
    let located = folders(settings, args)?;
    let (pipelines, plugins) = (located.pipelines.clone(), located.plugins.clone());
    let code = runtime()?.block_on(echo_worker::service::run(settings, role, pipelines, plugins));
    drop(located);
    code
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

const fn json(format: Format) -> bool {
    matches!(format, Format::Json)
}

/// Logs go to stderr so that stdout stays clean for DOT, JSON and TOML output.
fn init_tracing(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&settings.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour).init();
}

/// The pipelines and plugins folders to load, and the embedded copies they may point into.
struct Located {
    pipelines: PathBuf,
    plugins: PathBuf,
    /// The unpacked embedded files, removed when this is dropped, so it lives as long as the folders are used.
    _embedded: Option<echo_worker::defaults::Unpacked>,
}

/// The pipelines and plugins folders: from the flags, else the settings. Each folder on its own that was neither
/// given nor configured and holds no `.toml` file here (usually: is not there) is replaced by the shipped one
/// embedded in the binary, unpacked into a private temporary directory.
fn folders(settings: &Settings, folders: &Folders) -> anyhow::Result<Located> {
    let mut pipelines = folders.pipelines.clone().unwrap_or_else(|| settings.paths.pipelines.clone());
    let mut plugins = folders.plugins.clone().unwrap_or_else(|| settings.paths.plugins.clone());
    let standard = Settings::default().paths;
    let absent = |folder: &Path| echo_worker::document::toml_files(folder).map_or(true, |files| files.is_empty());
    let embed_pipelines =
        folders.pipelines.is_none() && settings.paths.pipelines == standard.pipelines && absent(&pipelines);
    let embed_plugins = folders.plugins.is_none() && settings.paths.plugins == standard.plugins && absent(&plugins);
    if !embed_pipelines && !embed_plugins {
        return Ok(Located { pipelines, plugins, _embedded: None });
    }
    let unpacked = echo_worker::defaults::unpack(&settings.paths.temp_dir)?;
    for (embed, folder, unpacked) in
        [(embed_pipelines, &mut pipelines, unpacked.pipelines()), (embed_plugins, &mut plugins, unpacked.plugins())]
    {
        if embed {
            tracing::info!(
                "no {}/*.toml here; using the {} embedded in echo-worker",
                folder.display(),
                folder.display()
            );
            *folder = unpacked;
        }
    }
    Ok(Located { pipelines, plugins, _embedded: Some(unpacked) })
}

fn validate(settings: &Settings, args: &Folders, format: Format) -> anyhow::Result<ExitCode> {
    let located = folders(settings, args)?;
    let (pipelines, plugins) = (&located.pipelines, &located.plugins);
    let (catalog, diagnostics) = match Catalog::load(pipelines, plugins) {
        Ok(catalog) => (catalog, Vec::new()),
        Err(LoadError::Invalid(diagnostics)) => (Catalog::default(), diagnostics),
        Err(error) => return Err(error.into()),
    };
    match format {
        Format::Text => print_text(&catalog, &diagnostics, pipelines, plugins)?,
        Format::Json => print_json(&catalog, &diagnostics)?,
    }
    Ok(if diagnostics.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Names and paths are escaped: they come from files and folders that anyone may have written.
fn print_text(catalog: &Catalog, diagnostics: &[Diagnostic], pipelines: &Path, plugins: &Path) -> anyhow::Result<()> {
    let path = |path: &Path| terminal::escape(&path.display().to_string()).into_owned();
    if !diagnostics.is_empty() {
        for diagnostic in diagnostics {
            terminal::eprintln(diagnostic);
        }
        terminal::eprintln(format_args!(
            "{} problem{} in {} and {}",
            diagnostics.len(),
            if diagnostics.len() == 1 { "" } else { "s" },
            path(pipelines),
            path(plugins)
        ));
        return Ok(());
    }
    for pipeline in catalog.pipelines.values() {
        terminal::println(format_args!("{} ({})", terminal::escape(&pipeline.name), path(&pipeline.file)))?;
        for (index, stage) in pipeline.stages.iter().enumerate() {
            let needs =
                if stage.needs.is_empty() { String::new() } else { format!("  needs {}", stage.needs.join(", ")) };
            let line = format!("  {:>2}. {:<16} uses {}{needs}", index + 1, stage.id, stage.uses);
            terminal::println(terminal::escape(&line))?;
        }
    }
    terminal::println(format_args!(
        "{} pipelines and {} plugins are valid",
        catalog.pipelines.len(),
        catalog.plugins.len()
    ))?;
    Ok(())
}

fn print_json(catalog: &Catalog, diagnostics: &[Diagnostic]) -> anyhow::Result<()> {
    let pipelines: Vec<_> = catalog.pipelines.values().map(pipeline_json).collect();
    let plugins: Vec<_> = catalog
        .plugins
        .values()
        .map(|plugin| json!({ "name": plugin.name, "kind": plugin.kind, "file": plugin.file }))
        .collect();
    let report = json!({
        "valid": diagnostics.is_empty(),
        "pipelines": pipelines,
        "plugins": plugins,
        "errors": diagnostics,
    });
    terminal::println(serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

fn pipeline_json(pipeline: &Pipeline) -> serde_json::Value {
    let stages: Vec<_> = pipeline
        .stages
        .iter()
        .map(|stage| json!({ "id": stage.id, "uses": stage.uses.name(), "needs": stage.needs }))
        .collect();
    json!({ "name": pipeline.name, "file": pipeline.file, "description": pipeline.description, "stages": stages })
}

fn graph(settings: &Settings, args: &Folders, name: &str, format: GraphFormat) -> anyhow::Result<ExitCode> {
    let located = folders(settings, args)?;
    let catalog = Catalog::load(&located.pipelines, &located.plugins)?;
    let pipeline = catalog.pipeline(name)?;
    let label = |id: &str| pipeline.stage(id).map(|stage| stage.uses.name().to_string()).unwrap_or_default();
    match format {
        GraphFormat::Dot => terminal::print(pipeline.graph.to_dot(&pipeline.name, label))?,
        GraphFormat::Mermaid => terminal::print(pipeline.graph.to_mermaid(label))?,
    }
    Ok(ExitCode::SUCCESS)
}
