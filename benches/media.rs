//! The media half of a job on a big file, measured: a generated ~500 MB WAV (45 minutes of 48 kHz stereo)
//! is served over loopback HTTP and run through validate → download → transcode by the engine. It prints the
//! process's peak resident memory (target: under 100 MB, whatever the file size) and the transcode stage's
//! time against the same bare `ffmpeg` encode run alone (target ratio: 1.15 or less).
//!
//! Run with `cargo bench --bench media`; it needs ffmpeg and about 1.2 GB of free disk in the temp dir.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use echo_worker::document::Document;
use echo_worker::engine::{Engine, EngineSettings, JobStatus, StageRegistry};
use echo_worker::job::JobSpec;
use echo_worker::job::checkpoint::MemoryCheckpoints;
use echo_worker::job::progress::NullSink;
use echo_worker::pipeline::compile::compile;
use echo_worker::plugin::PluginSet;
use echo_worker::source::{Fetcher, SourcePolicy};

use echo_worker::stage::builtin::download::DownloadStage;
use echo_worker::stage::builtin::transcode::TranscodeStage;
use echo_worker::stage::builtin::validate::ValidateStage;
use echo_worker::stage::{Stage, StageContext};
use echo_worker::units::ByteSize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;

/// The length of the generated recording.
const MINUTES: u32 = 45;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn generate(path: &Path) {
    let seconds = (MINUTES * 60).to_string();
    let source = format!("sine=frequency=440:sample_rate=48000:duration={seconds}");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", &source, "-af", "volume=0.5", "-ac", "2", "-c:a", "pcm_s16le"])
        .arg(path)
        .status()
        .expect("ffmpeg is installed");
    assert!(status.success());
}

/// Serves the file with HEAD and `Range: bytes=a-` support, streaming 64 KiB at a time.
async fn serve(State(path): State<Arc<PathBuf>>, method: Method, headers: HeaderMap) -> Response {
    let total = tokio::fs::metadata(&*path).await.unwrap().len();
    let start: u64 = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(total);
    let mut response = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        let mut file = tokio::fs::File::open(&*path).await.unwrap();
        file.seek(SeekFrom::Start(start)).await.unwrap();
        let stream = futures_util::stream::unfold(file, |mut file| async move {
            let mut buffer = vec![0u8; 64 << 10];
            match file.read(&mut buffer).await {
                Ok(0) | Err(_) => None,
                Ok(read) => {
                    buffer.truncate(read);
                    Some((Ok::<_, std::io::Error>(Bytes::from(buffer)), file))
                }
            }
        });
        Response::new(Body::from_stream(stream))
    };
    let headers_out = response.headers_mut();
    headers_out.insert(header::CONTENT_LENGTH, (total - start).into());
    headers_out.insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if headers.contains_key(header::RANGE) {
        headers_out.insert(header::CONTENT_RANGE, format!("bytes {start}-{}/{total}", total - 1).parse().unwrap());
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response.into_response()
}

async fn transcode_once(input: &Path, work: &Path) -> Duration {
    let ctx = StageContext {
        job: Arc::new(JobSpec::default()),
        stage_id: "transcode".into(),
        params: serde_json::json!({ "input": input, "split_at_silence": true }),
        work_dir: Arc::new(echo_worker::stage::WorkDir::existing(work)),
        inputs: Arc::new(Default::default()),
        progress: echo_worker::job::progress::ProgressReporter::detached(),
        cancel: CancellationToken::new(),
        attempt: 1,
        item: None,
        checkpoints: Arc::new(echo_worker::job::checkpoint::MemoryCheckpoints::default()),
    };
    let started = Instant::now();
    TranscodeStage.run(ctx).await.expect("transcode succeeds");
    started.elapsed()
}

fn bare_ffmpeg_once(input: &Path, work: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-v", "error", "-y", "-i"])
        .arg(input)
        .args(["-map", "0:a:0", "-vn", "-ac", "1", "-ar", "16000", "-c:a", "libmp3lame", "-b:a", "32k"])
        .arg(work.join("bare.mp3"))
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("long.wav");
    generate(&source);
    let size = std::fs::metadata(&source).unwrap().len();
    println!("source: {MINUTES} min of 48 kHz stereo WAV, {} bytes", size);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let app = axum::Router::new().route("/long.wav", axum::routing::get(serve)).with_state(Arc::new(source.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/long.wav", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let policy = SourcePolicy { allow_private: vec!["127.0.0.1".parse().unwrap()], max_redirects: 5, ..SourcePolicy::default() };
        let fetcher = Fetcher::new(policy).unwrap();
        let mut registry = StageRegistry::new();
        registry.register("validate", Arc::new(ValidateStage::new(fetcher.clone(), ByteSize(1 << 30))));
        registry.register("download", Arc::new(DownloadStage::new(fetcher, ByteSize(1 << 30))));
        registry.register("transcode", Arc::new(TranscodeStage));
        let work_root = tempfile::tempdir().unwrap();
        let settings = EngineSettings { work_root: work_root.path().to_path_buf(), ..EngineSettings::default() };
        let engine = Engine::new(registry, Arc::new(MemoryCheckpoints::default()), settings);
        let text = "name = \"bench\"\n[stages.validate]\nuses = \"validate\"\n[stages.download]\nuses = \"download\"\nneeds = [\"validate\"]\n\
                    [stages.transcode]\nuses = \"transcode\"\nneeds = [\"download\"]\nwith = { split_at_silence = true }\n";
        let pipeline = compile(&Document::new("bench.toml", text), &PluginSet::default(), &[]).unwrap();
        let job = JobSpec { id: "bench-media".into(), source: Some(url), ..JobSpec::default() };
        let started = Instant::now();
        let report = engine.run(&pipeline, job, Arc::new(NullSink), CancellationToken::new()).await.unwrap();
        let took = started.elapsed();
        assert_eq!(report.status, JobStatus::Succeeded, "{:?}", report.failure);
        let chunks = report.stages["transcode"].output.as_ref().unwrap()["chunks"].as_array().unwrap().len();
        println!("validate → download → transcode over loopback HTTP: {took:.1?}, {chunks} chunks");
        println!("peak RSS of this process (server, engine, stages): {:.1} MiB", peak_rss_mib());

        let work = tempfile::tempdir().unwrap();
        let mut ours = Vec::new();
        let mut bare = Vec::new();
        for _ in 0..3 {
            bare.push(bare_ffmpeg_once(&source, work.path()));
            let run = tempfile::tempdir().unwrap();
            ours.push(transcode_once(&source, run.path()).await);
        }
        ours.sort();
        bare.sort();
        let (ours, bare) = (ours[1], bare[1]);
        println!("transcode stage (encode + silencedetect + cut): {ours:.2?} median of 3");
        println!("bare ffmpeg encode, same settings:              {bare:.2?} median of 3");
        println!("ratio: {:.3}", ours.as_secs_f64() / bare.as_secs_f64());
    });
    println!("peak RSS at exit: {:.1} MiB", peak_rss_mib());
}
