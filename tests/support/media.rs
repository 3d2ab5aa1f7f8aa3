//! Media made at test time with ffmpeg (never committed binaries), and a way to run one builtin stage
//! directly with a context of the test's choosing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use echo_worker::job::JobSpec;
use echo_worker::job::progress::ProgressReporter;
use echo_worker::job::{StageError, StageOutput};
use echo_worker::stage::{Stage, StageContext};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Runs ffmpeg with `args` (after `-v error -y`) and panics on failure.
pub fn ffmpeg(args: &[&str]) {
    let output = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).output().expect("ffmpeg is installed");
    assert!(output.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// `seconds` of a 440 Hz tone in `name` (the extension picks the format).
pub fn tone(dir: &Path, name: &str, seconds: u32) -> PathBuf {
    let path = dir.join(name);
    let source = format!("sine=frequency=440:duration={seconds}");
    ffmpeg(&["-f", "lavfi", "-i", &source, "-ac", "1", path.to_str().unwrap()]);
    path
}

/// A video with a sound track (or without one).
pub fn video(dir: &Path, name: &str, with_audio: bool) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["-f", "lavfi", "-i", "testsrc=size=160x120:rate=10:duration=4"];
    if with_audio {
        args.extend(["-f", "lavfi", "-i", "sine=frequency=330:duration=4", "-shortest"]);
    }
    args.extend(["-pix_fmt", "yuv420p", path.to_str().unwrap()]);
    ffmpeg(&args);
    path
}

/// A tone of `seconds`, silent for 2 s out of every `period` seconds (from `period - 2` to `period`), as a
/// 16 kHz mono MP3. Returns the file and the silent intervals.
pub fn with_silences(dir: &Path, name: &str, seconds: u32, period: u32) -> (PathBuf, Vec<(f64, f64)>) {
    let path = dir.join(name);
    let expression = format!("sin(2*PI*440*t)*0.5*lt(mod(t\\,{period})\\,{})", period - 2);
    let source = format!("aevalsrc={expression}:s=16000:d={seconds}");
    ffmpeg(&["-f", "lavfi", "-i", &source, "-c:a", "libmp3lame", "-b:a", "32k", path.to_str().unwrap()]);
    let silences = (1..=seconds / period).map(|k| (f64::from(k * period - 2), f64::from(k * period))).collect();
    (path, silences)
}

/// A job whose source is `source`, as typed on the command line when `trusted`.
pub fn job(source: &str, trusted: bool) -> Arc<JobSpec> {
    Arc::new(JobSpec {
        id: "media-test".into(),
        recording_id: Some("rec-media".into()),
        pipeline: "test".into(),
        params: serde_json::Map::new(),
        source: Some(source.to_string()),
        trusted_source: trusted,
    })
}

/// Runs `stage` once with the given params, inputs and work directory.
pub async fn run_stage(
    stage: &dyn Stage,
    job: Arc<JobSpec>,
    params: Value,
    inputs: BTreeMap<String, Value>,
    work_dir: &Path,
) -> Result<StageOutput, StageError> {
    run_stage_with(stage, job, params, inputs, work_dir, CancellationToken::new()).await
}

/// Like [`run_stage`], with a cancellation token.
pub async fn run_stage_with(
    stage: &dyn Stage,
    job: Arc<JobSpec>,
    params: Value,
    inputs: BTreeMap<String, Value>,
    work_dir: &Path,
    cancel: CancellationToken,
) -> Result<StageOutput, StageError> {
    let ctx = StageContext {
        job,
        stage_id: "under_test".into(),
        params,
        work_dir: Arc::new(echo_worker::stage::WorkDir::existing(work_dir)),
        inputs: Arc::new(inputs),
        progress: ProgressReporter::detached(),
        cancel,
        attempt: 1,
        item: None,
        checkpoints: Arc::new(echo_worker::job::checkpoint::MemoryCheckpoints::default()),
    };
    stage.run(ctx).await
}
