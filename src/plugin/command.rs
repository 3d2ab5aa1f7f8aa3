//! The `command` plugin kind: an external program run in the job's work directory with the params as JSON on
//! stdin and JSON expected on stdout.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Plugin, PluginAction};
use crate::child;
use crate::pipeline::template::Renderer;
use crate::stage::{Stage, StageContext, StageError, StageOutput};

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
/// - stdin is the params as JSON; stdout is the output (JSON, or `{ "text": ... }` when it is not JSON).
/// - Exit status 0 succeeds; 75 (`EX_TEMPFAIL`) is a failure worth retrying; anything else is permanent.
///   The error carries the last part of stderr.
/// - On cancel the whole process group gets SIGTERM, then SIGKILL after a short grace, so grandchildren die
///   too; after a normal exit, leftovers in the group are killed as well.
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
            return Err(StageError::permanent("plugin", format!("plugin `{}` is not a command", self.plugin.name)));
        };
        let name = &self.plugin.name;
        let params = self.plugin.params(&ctx.params)?;
        let context = self.plugin.template_context(&ctx, &params);
        let mut args = Vec::with_capacity(section.args.len());
        for (index, arg) in section.args.iter().enumerate() {
            let location = format!("command.args[{index}]");
            args.push(self.plugin.render_text_async(&self.renderer, arg, &context, &location, &ctx.cancel).await?);
        }

        let mut command = Command::new(&self.program);
        command
            .args(&args)
            .current_dir(&ctx.work_dir)
            .env_clear()
            .envs(self.environment())
            .env("ECHO_JOB_ID", &ctx.job.id)
            .env("ECHO_STAGE_ID", &ctx.stage_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        child::isolate(&mut command);
        let mut child = command.spawn().map_err(|error| {
            StageError::permanent(
                "spawn",
                format!("plugin `{name}`: cannot start `{}`: {error}", self.program.display()),
            )
        })?;
        let group = child::group(&child);

        let input = serde_json::to_vec(&params).unwrap_or_default();
        let mut stdin = child.stdin.take();
        let feed = tokio::spawn(async move {
            if let Some(stdin) = stdin.as_mut() {
                // A program that does not read stdin closes it early; that is not an error.
                let _ = stdin.write_all(&input).await;
            }
        });
        let stdout = child.stdout.take().map(|pipe| tokio::spawn(read_limited(pipe, MAX_STDOUT)));
        let stderr = child.stderr.take().map(|pipe| tokio::spawn(read_limited(pipe, usize::MAX)));

        let status = tokio::select! {
            status = child.wait() => status,
            () = ctx.cancel.cancelled() => {
                child::terminate(&mut child, TERM_GRACE).await;
                feed.abort();
                return Err(StageError::cancelled());
            }
        };
        // The program is gone; anything it left running in its group goes too.
        child::kill_group(group);
        feed.abort();
        let status = status.map_err(|error| {
            StageError::transient("wait", format!("plugin `{name}`: waiting for the program: {error}"))
        })?;
        let (stdout, stdout_overflow) = collect(stdout).await;
        let (stderr, _) = collect(stderr).await;
        if status.success() {
            if stdout_overflow {
                return Err(StageError::permanent(
                    "output_too_large",
                    format!("plugin `{name}`: stdout exceeds {MAX_STDOUT} bytes"),
                ));
            }
            return Ok(StageOutput::from(parse_output(&stdout)));
        }
        let tail = tail(&stderr);
        let message = match status.code() {
            Some(code) => format!("plugin `{name}` exited with status {code}: {tail}"),
            None => format!("plugin `{name}` was killed by a signal: {tail}"),
        };
        if status.code() == Some(EX_TEMPFAIL) {
            Err(StageError::transient("exit_status", message))
        } else {
            Err(StageError::permanent("exit_status", message))
        }
    }
}

/// Reads a pipe to its end, keeping at most `limit` bytes; the flag says whether more was discarded.
async fn read_limited(mut pipe: impl tokio::io::AsyncRead + Unpin, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    let mut overflow = false;
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..read.min(room)]);
                overflow |= read > room;
                if limit == usize::MAX && kept.len() > 4 * STDERR_TAIL {
                    // Only the tail of stderr is ever shown; drop the head so memory stays bounded.
                    kept.drain(..kept.len() - STDERR_TAIL);
                }
            }
        }
    }
    (kept, overflow)
}

/// Waits briefly for a reader; a pipe held open by an escaped process must not hang the stage.
async fn collect(reader: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else { return (Vec::new(), false) };
    match tokio::time::timeout(Duration::from_secs(2), &mut reader).await {
        Ok(Ok(result)) => result,
        _ => {
            reader.abort();
            (Vec::new(), false)
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
