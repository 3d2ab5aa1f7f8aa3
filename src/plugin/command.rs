//! The `command` plugin kind: an external program run in the job's work directory with the params as JSON on
//! stdin and JSON expected on stdout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Plugin, PluginAction};
use crate::child;
use crate::error::ErrorCode;
use crate::job::{StageError, StageOutput};
use crate::stage::{Stage, StageContext};
use crate::template::Renderer;

/// The `[command]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSection {
    /// The program: a path relative to the plugin's folder, or a name looked up on `PATH`. Never a template.
    pub program: String,
    /// Argument templates.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Runs a `command` plugin as a child process.
///
/// - The program is resolved against the plugin's folder first, then `PATH`; it is never taken from a template.
/// - It runs in the job's work directory, in its own process group, with an environment holding only `PATH`,
///   `HOME`, `LANG`, `LC_ALL`, `TZ`, `TMPDIR`, the plugin's declared `env` names, and `ECHO_JOB_ID` /
///   `ECHO_STAGE_ID`.
/// - stdin is the params as JSON; stdout is the output (JSON, or `{ "text": ... }` when it is not JSON). A plugin
///   with an `[output]` schema must print JSON: empty or non-JSON stdout fails the stage.
/// - Exit status 0 succeeds; 75 (`EX_TEMPFAIL`) is a failure worth retrying; anything else is permanent.
///   The error carries the last part of stderr.
/// - On cancel the whole process group gets SIGTERM, then SIGKILL after a short grace, so grandchildren die
///   too; after a normal exit, leftovers in the group are killed as well, and the pipes are read until they
///   close or stay quiet for 200 ms (2 s at most), so a process that escaped the group with `setsid` and holds
///   stdout open can neither hang the stage nor erase what the program printed.
#[derive(Debug)]
pub struct CommandStage {
    plugin: Arc<Plugin>,
    program: PathBuf,
    renderer: Renderer,
}

/// Exit status a command uses to ask for a retry (sysexits.h `EX_TEMPFAIL`).
const EX_TEMPFAIL: i32 = 75;
/// Largest stdout accepted; a plugin's output is JSON for templates, not a media file.
const MAX_STDOUT: usize = 16 << 20;
/// How much of stderr an error message keeps.
const STDERR_TAIL: usize = 2000;
/// Time between SIGTERM and SIGKILL on cancel: short, since a cancelled job must stop within about a second.
const TERM_GRACE: Duration = Duration::from_millis(400);
/// After the program exits, how long its pipes may stay silent before reading stops.
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// After the program exits, how long its pipes are read at most.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Environment variables passed through to every command.
const PASSED_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

impl CommandStage {
    /// Prepares the plugin's program.
    pub fn new(plugin: Arc<Plugin>) -> Self {
        let program = match &plugin.action {
            PluginAction::Command(section) => resolve_program(&plugin.file, &section.program),
            _ => PathBuf::new(),
        };
        Self { plugin, program, renderer: Renderer::default() }
    }
}

impl CommandStage {
    /// The variables the program gets from this process: the basic ones and the plugin's declared names.
    fn environment(&self) -> Vec<(String, std::ffi::OsString)> {
        let declared = self.plugin.env.iter().map(String::as_str);
        PASSED_ENV
            .into_iter()
            .chain(declared)
            .filter_map(|name| std::env::var_os(name).map(|value| (name.to_string(), value)))
            .collect()
    }
}

/// `program` relative to the plugin file's folder when it exists there, otherwise as given (found on `PATH`).
fn resolve_program(plugin_file: &Path, program: &str) -> PathBuf {
    let folder = plugin_file.parent().unwrap_or_else(|| Path::new("."));
    let local = folder.join(program);
    if local.is_file() { std::path::absolute(&local).unwrap_or(local) } else { PathBuf::from(program) }
}

#[async_trait::async_trait]
impl Stage for CommandStage {
    async fn run(&self, ctx: StageContext) -> Result<StageOutput, StageError> {
        let PluginAction::Command(section) = &self.plugin.action else {
            return Err(StageError::permanent(
                ErrorCode::Plugin,
                format!("plugin `{}` is not a command", self.plugin.name),
            ));
        };
        let name = &self.plugin.name;
        let params = self.plugin.params(&ctx.params)?;
        let context = self.plugin.template_context(&ctx, &params);
        let mut args = Vec::with_capacity(section.args.len());
        for (index, arg) in section.args.iter().enumerate() {
            let location = format!("command.args[{index}]");
            args.push(self.plugin.render_text_async(&self.renderer, arg, &context, &location, &ctx.cancel).await?);
        }

        let work_dir = ctx
            .work_dir
            .ensure()
            .map_err(|error| StageError::transient(ErrorCode::Io, format!("plugin `{name}`: {error}")))?;
        let mut command = Command::new(&self.program);
        command
            .args(&args)
            .current_dir(work_dir)
            .env_clear()
            .envs(self.environment())
            .env("ECHO_JOB_ID", &ctx.job.id)
            .env("ECHO_STAGE_ID", &ctx.stage_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (mut child, group) = child::spawn(&mut command).map_err(|error| {
            StageError::permanent(
                ErrorCode::Spawn,
                format!("plugin `{name}`: cannot start `{}`: {error}", self.program.display()),
            )
        })?;

        // The pipes are read here, in the stage's own task, so that nothing outlives the stage: when it ends or
        // is dropped, the readers, the writer and (through `group`) the processes go with it.
        let input = serde_json::to_vec(&params).unwrap_or_default();
        let stdin = child.stdin.take();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read stdin closes it early; that is not an error.
                let _ = stdin.write_all(&input).await;
            }
        };
        tokio::pin!(feed);
        let mut fed = false;
        let mut stdout = Capture::new(child.stdout.take(), MAX_STDOUT);
        let mut stderr = Capture::new(child.stderr.take(), usize::MAX);
        let status = loop {
            tokio::select! {
                () = &mut feed, if !fed => fed = true,
                () = stdout.read(), if stdout.is_open() => {}
                () = stderr.read(), if stderr.is_open() => {}
                status = child.wait() => break status,
                () = ctx.cancel.cancelled() => {
                    child::terminate(&mut child, TERM_GRACE).await;
                    return Err(StageError::cancelled());
                }
            }
        };
        // The program is gone; anything it left running in its group goes too. Then what it wrote is read
        // until the pipes close or go quiet: a process that left the group (`setsid`) may hold them open, and
        // must neither hang the stage nor make it lose the output already written.
        group.kill();
        drain(&mut stdout, &mut stderr).await;
        let held = stdout.is_open() || stderr.is_open();
        if held {
            tracing::warn!(plugin = %name, "a process the plugin started left its process group and still holds its output open");
        }
        let status = status.map_err(|error| {
            StageError::transient(ErrorCode::Wait, format!("plugin `{name}`: waiting for the program: {error}"))
        })?;
        if status.success() {
            if stdout.overflow {
                return Err(StageError::permanent(
                    ErrorCode::OutputTooLarge,
                    format!("plugin `{name}`: stdout exceeds {MAX_STDOUT} bytes"),
                ));
            }
            return self.output(&stdout.kept, held).map(StageOutput::from);
        }
        let tail = tail(&stderr.kept);
        let message = match status.code() {
            Some(code) => format!("plugin `{name}` exited with status {code}: {tail}"),
            None => format!("plugin `{name}` was killed by a signal: {tail}"),
        };
        if status.code() == Some(EX_TEMPFAIL) {
            Err(StageError::transient(ErrorCode::ExitStatus, message))
        } else {
            Err(StageError::permanent(ErrorCode::ExitStatus, message))
        }
    }
}

impl CommandStage {
    /// The stage's output from stdout: JSON, or `{ "text": ... }`. A plugin that declares an `[output]` schema
    /// promises JSON, so empty or non-JSON stdout fails the stage instead of passing an empty result on.
    fn output(&self, stdout: &[u8], held: bool) -> Result<serde_json::Value, StageError> {
        let name = &self.plugin.name;
        if self.plugin.output.is_none() {
            return Ok(parse_output(stdout));
        }
        let why = if held { " (a process it started left its process group and kept stdout open)" } else { "" };
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(StageError::permanent(
                ErrorCode::EmptyOutput,
                format!("plugin `{name}` declares a JSON output but exited with nothing on stdout{why}"),
            ));
        }
        serde_json::from_slice(stdout).map_err(|error| {
            StageError::permanent(
                ErrorCode::InvalidOutput,
                format!("plugin `{name}` declares a JSON output but its stdout is not JSON: {error}{why}"),
            )
        })
    }
}

/// One output pipe of the program and what was read from it.
struct Capture<R> {
    pipe: Option<R>,
    /// At most `limit` bytes; for stderr (`usize::MAX`), only the tail is kept.
    kept: Vec<u8>,
    limit: usize,
    /// More than `limit` bytes came.
    overflow: bool,
}

impl<R: AsyncRead + Unpin> Capture<R> {
    fn new(pipe: Option<R>, limit: usize) -> Self {
        Self { pipe, kept: Vec::new(), limit, overflow: false }
    }

    fn is_open(&self) -> bool {
        self.pipe.is_some()
    }

    /// Reads one chunk; the pipe is closed at its end or on an error. Cancel-safe: a chunk is kept only
    /// once it has been read.
    async fn read(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else { return };
        let mut buffer = [0u8; 8192];
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => self.pipe = None,
            Ok(read) => {
                let room = self.limit.saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&buffer[..read.min(room)]);
                self.overflow |= read > room;
                if self.limit == usize::MAX && self.kept.len() > 4 * STDERR_TAIL {
                    // Only the tail of stderr is ever shown; drop the head so memory stays bounded.
                    self.kept.drain(..self.kept.len() - STDERR_TAIL);
                }
            }
        }
    }
}

/// After the program exited: reads both pipes until they close, or until nothing came for [`DRAIN_QUIET`],
/// and for [`DRAIN_LIMIT`] at most.
async fn drain<A: AsyncRead + Unpin, B: AsyncRead + Unpin>(stdout: &mut Capture<A>, stderr: &mut Capture<B>) {
    let deadline = tokio::time::sleep(DRAIN_LIMIT);
    tokio::pin!(deadline);
    while stdout.is_open() || stderr.is_open() {
        tokio::select! {
            () = stdout.read(), if stdout.is_open() => {}
            () = stderr.read(), if stderr.is_open() => {}
            () = tokio::time::sleep(DRAIN_QUIET) => break,
            () = &mut deadline => break,
        }
    }
}

fn parse_output(stdout: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stdout)
        .unwrap_or_else(|_| serde_json::json!({ "text": String::from_utf8_lossy(stdout).trim_end() }))
}

fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        return "(no output on stderr)".to_string();
    }
    let start = text.len().saturating_sub(STDERR_TAIL);
    let start = (start..text.len()).find(|index| text.is_char_boundary(*index)).unwrap_or(text.len());
    text[start..].to_string()
}
