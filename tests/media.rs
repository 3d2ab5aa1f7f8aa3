//! The `validate` and `transcode` stages on media generated with ffmpeg: every kind of good and bad file, and
//! a 50-minute recording cut into chunks at fixed times and in known silences.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use echo_worker::error::ErrorCode;
use echo_worker::job::StageError;
use echo_worker::source::{Fetcher, SourcePolicy};
use echo_worker::stage::builtin::transcode::TranscodeStage;
use echo_worker::stage::builtin::validate::ValidateStage;
use echo_worker::units::ByteSize;
use serde_json::{Value, json};
use support::media::{ffmpeg, job, run_stage, tone, video, with_silences};

fn validator() -> ValidateStage {
    let policy = SourcePolicy { max_redirects: 5, ..SourcePolicy::default() };
    ValidateStage::new(Fetcher::new(policy).unwrap(), ByteSize(500_000_000))
}

async fn validate(path: &Path, params: Value) -> Result<Value, StageError> {
    let work = tempfile::tempdir().unwrap();
    run_stage(&validator(), job(path.to_str().unwrap(), true), params, BTreeMap::new(), work.path())
        .await
        .map(|output| output.value)
}

async fn refused(path: &Path, params: Value) -> StageError {
    let error = validate(path, params).await.expect_err("the file is refused");
    assert!(!error.retryable, "a bad file is not retried: {error:?}");
    error
}

#[tokio::test]
async fn good_audio_and_video_files_pass_with_their_facts() {
    let dir = tempfile::tempdir().unwrap();
    for (name, mime, codec) in
        [("a.wav", "audio/wav", "pcm_s16le"), ("a.mp3", "audio/mpeg", "mp3"), ("a.m4a", "audio/mp4", "aac")]
    {
        let file = tone(dir.path(), name, 3);
        let output = validate(&file, json!({})).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(output["mime"], mime, "{name}");
        assert_eq!(output["audio"]["codec"], codec, "{name}");
        assert_eq!(output["video"], false, "{name}");
        let duration = output["duration"].as_f64().unwrap();
        assert!((duration - 3.0).abs() < 0.1, "{name}: {duration}");
        assert_eq!(output["size"].as_u64(), Some(std::fs::metadata(&file).unwrap().len()));
    }
    let (pauses, _) = with_silences(dir.path(), "pauses.mp3", 60, 20);
    let output = validate(&pauses, json!({})).await.unwrap();
    assert_eq!(output["mime"], "audio/mpeg");
    assert!((output["duration"].as_f64().unwrap() - 60.0).abs() < 0.2);
    let clip = video(dir.path(), "clip.mp4", true);
    let output = validate(&clip, json!({})).await.unwrap();
    assert_eq!((output["mime"].as_str(), output["video"].as_bool()), (Some("video/mp4"), Some(true)));
    assert_eq!(output["audio"]["sample_rate"], 44100);
}

#[tokio::test]
async fn bad_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let silent_video = video(dir.path(), "silent.mp4", false);
    let error = refused(&silent_video, json!({})).await;
    assert_eq!(error.code, ErrorCode::NoAudio);
    assert_eq!(error.message, "the file has no audio to transcribe: a video without sound");

    let empty = dir.path().join("empty.mp3");
    std::fs::write(&empty, b"").unwrap();
    let error = refused(&empty, json!({})).await;
    assert_eq!((error.code, error.message.as_str()), (ErrorCode::Empty, "the file is empty (0 bytes)"));

    let png = dir.path().join("picture.png");
    ffmpeg(&["-f", "lavfi", "-i", "color=c=red:s=32x32:d=1", "-frames:v", "1", png.to_str().unwrap()]);
    let renamed = dir.path().join("song.mp3");
    std::fs::rename(&png, &renamed).unwrap();
    let error = refused(&renamed, json!({})).await;
    assert_eq!(error.code, ErrorCode::NotMedia);
    assert_eq!(error.message, "the file is not audio or video: its bytes are image/png");

    let whole = tone(dir.path(), "whole.mp3", 20);
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = dir.path().join("truncated.mp3");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let error = refused(&truncated, json!({})).await;
    assert_eq!(error.code, ErrorCode::Truncated, "{}", error.message);
    assert!(error.message.contains("announces 20.0 s"), "{}", error.message);

    let text = dir.path().join("notes.m4a");
    std::fs::write(&text, "meeting notes, not a recording\n".repeat(40)).unwrap();
    let error = refused(&text, json!({})).await;
    assert_eq!(error.message, "the file is not audio or video: its bytes are text/plain");
}

#[tokio::test]
async fn limits_and_accepted_types_come_from_the_params() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path(), "long.mp3", 8);
    let error = refused(&file, json!({ "max_size": "10KB" })).await;
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(error.message.starts_with("the file is "), "{}", error.message);
    assert!(error.message.ends_with("over the limit of 10 KB"), "{}", error.message);
    let error = refused(&file, json!({ "max_duration": "5s" })).await;
    assert_eq!(
        (error.code, error.message.as_str()),
        (ErrorCode::TooLong, "the recording lasts 8s, over the limit of 5s")
    );
    let clip = video(dir.path(), "clip.mp4", true);
    let error = refused(&clip, json!({ "accept": ["audio/*"] })).await;
    assert_eq!(error.message, "video/mp4 is not accepted here (accepted: audio/*)");
    let error = validate(&file, json!({ "max_size": 12 })).await.unwrap_err();
    assert_eq!(error.code, ErrorCode::TooLarge, "a bare number counts bytes");
}

#[tokio::test]
async fn sizes_in_refusals_print_in_human_units() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path(), "long.mp3", 8);
    let size = std::fs::metadata(&file).unwrap().len();
    let error = refused(&file, json!({ "max_size": "10KB" })).await;
    let figure = error
        .message
        .strip_prefix("the file is ")
        .and_then(|rest| rest.strip_suffix(" KB, over the limit of 10 KB"))
        .unwrap_or_else(|| panic!("{}", error.message));
    let (whole, tenth) = figure.split_once('.').unwrap_or_else(|| panic!("one decimal: {}", error.message));
    assert_eq!(tenth.len(), 1, "{}", error.message);
    let kilobytes: f64 = format!("{whole}.{tenth}").parse().unwrap();
    assert!((kilobytes - size as f64 / 1000.0).abs() <= 0.05, "{kilobytes} KB for {size} bytes");
}

/// A 2-second 8 kHz FLAC whose STREAMINFO header is rewritten to declare `hours` of audio.
fn flac_declaring(dir: &Path, hours: u64) -> std::path::PathBuf {
    let path = dir.join("declares.flac");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-ar", "8000", "-ac", "1", path.to_str().unwrap()]);
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"fLaC");
    assert_eq!(bytes[4] & 0x7f, 0, "STREAMINFO comes first");
    // STREAMINFO starts at byte 8; its 36-bit total sample count is the low nibble of byte 21 and bytes 22..26.
    let samples = hours * 3600 * 8000;
    bytes[21] = (bytes[21] & 0xf0) | ((samples >> 32) & 0x0f) as u8;
    bytes[22..26].copy_from_slice(&((samples & 0xffff_ffff) as u32).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// A 3-second Ogg Opus file whose last page's granule position is rewritten to `hours` of 48 kHz samples. Its
/// last packets then carry timestamps near the declared end, so a decode there succeeds: before `validate` had
/// a default limit, such a file passed it.
fn ogg_declaring(dir: &Path, hours: u64) -> std::path::PathBuf {
    let path = dir.join("declares.opus");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=3",
        "-ar",
        "48000",
        "-c:a",
        "libopus",
        path.to_str().unwrap(),
    ]);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.windows(4).rposition(|window| window == b"OggS").expect("an Ogg page");
    let granule = hours * 3600 * 48_000;
    bytes[last + 6..last + 14].copy_from_slice(&granule.to_le_bytes());
    let segments = usize::from(bytes[last + 26]);
    let body: usize = bytes[last + 27..last + 27 + segments].iter().map(|&size| usize::from(size)).sum();
    let end = last + 27 + segments + body;
    bytes[last + 22..last + 26].copy_from_slice(&[0; 4]);
    let checksum = ogg_crc(&bytes[last..end]);
    bytes[last + 22..last + 26].copy_from_slice(&checksum.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// The Ogg page checksum: CRC-32, polynomial 0x04c11db7, no reflection, initial value 0.
fn ogg_crc(data: &[u8]) -> u32 {
    let mut crc = 0u32;
    for &byte in data {
        crc ^= u32::from(byte) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 { (crc << 1) ^ 0x04c1_1db7 } else { crc << 1 };
        }
    }
    crc
}

#[tokio::test]
async fn a_small_file_declaring_100_hours_is_refused_before_any_download() {
    let dir = tempfile::tempdir().unwrap();
    for file in [ogg_declaring(dir.path(), 100), flac_declaring(dir.path(), 100)] {
        assert!(std::fs::metadata(&file).unwrap().len() < 100_000, "a small file");
        let error = refused(&file, json!({})).await;
        assert_eq!(
            (error.code, error.message.as_str()),
            (ErrorCode::TooLong, "the recording lasts 4d4h, over the limit of 8h"),
            "{}",
            file.display()
        );
    }
    // The setting moves the default; a stage's own `max_duration` wins over it.
    let work = tempfile::tempdir().unwrap();
    let strict = validator().with_max_duration(echo_worker::units::HumanDuration::parse("1s").unwrap());
    let short = tone(dir.path(), "short.mp3", 3);
    let error = run_stage(&strict, job(short.to_str().unwrap(), true), json!({}), BTreeMap::new(), work.path())
        .await
        .unwrap_err();
    assert_eq!(
        (error.code, error.message.as_str()),
        (ErrorCode::TooLong, "the recording lasts 3s, over the limit of 1s")
    );
    let passed = run_stage(
        &strict,
        job(short.to_str().unwrap(), true),
        json!({ "max_duration": "1m" }),
        BTreeMap::new(),
        work.path(),
    )
    .await;
    assert!(passed.is_ok(), "{passed:?}");
}

#[tokio::test]
async fn ffprobe_output_is_read_up_to_a_cap() {
    let dir = tempfile::tempdir().unwrap();
    // A 5 MiB comment tag: ffprobe prints it whole in its JSON.
    let metadata = dir.path().join("metadata.txt");
    std::fs::write(&metadata, format!(";FFMETADATA1\ncomment={}\n", "x".repeat(5 << 20))).unwrap();
    let tagged = dir.path().join("tagged.flac");
    let (metadata, out) = (metadata.to_str().unwrap(), tagged.to_str().unwrap());
    ffmpeg(&["-f", "lavfi", "-i", "sine=duration=1", "-i", metadata, "-map", "0", "-map_metadata", "1", out]);
    let error = refused(&tagged, json!({})).await;
    assert_eq!(error.code, ErrorCode::NotMedia);
    assert!(
        error.message.ends_with(
            "it printed more than 4MiB of JSON, where a real file's is a few kilobytes (huge tags, or too many streams)"
        ),
        "{}",
        error.message
    );
}

fn transcoder_inputs(path: &Path) -> BTreeMap<String, Value> {
    BTreeMap::from([("download".to_string(), json!({ "path": path, "bytes": 1 }))])
}

async fn transcode(input: &Path, params: Value, work: &Path) -> Value {
    run_stage(&TranscodeStage, job("unused", true), params, transcoder_inputs(input), work)
        .await
        .unwrap_or_else(|error| panic!("transcode failed: {error}"))
        .value
}

fn chunks(output: &Value) -> Vec<(f64, f64, u64, String)> {
    output["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["start"].as_f64().unwrap(),
                c["end"].as_f64().unwrap(),
                c["bytes"].as_u64().unwrap(),
                c["path"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Chunks start at 0, follow each other without gaps, end at the duration, and respect both limits.
fn assert_covering(output: &Value, max_seconds: f64, max_bytes: u64) {
    let duration = output["duration"].as_f64().unwrap();
    let chunks = chunks(output);
    assert!(chunks[0].0.abs() < 0.05, "first chunk starts at 0: {chunks:?}");
    for pair in chunks.windows(2) {
        assert!((pair[1].0 - pair[0].1).abs() < 0.05, "no gap between {:?} and {:?}", pair[0], pair[1]);
    }
    assert!((chunks.last().unwrap().1 - duration).abs() < 0.1, "last chunk ends at {duration}: {chunks:?}");
    for (start, end, bytes, path) in &chunks {
        assert!(end - start <= max_seconds, "chunk {start}-{end} is within {max_seconds} s");
        assert!(*bytes <= max_bytes, "chunk of {bytes} bytes is within {max_bytes}");
        assert_eq!(std::fs::metadata(path).unwrap().len(), *bytes);
        let probed = Command::new("ffprobe")
            .args(["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path])
            .output()
            .unwrap();
        let real: f64 = String::from_utf8_lossy(&probed.stdout).trim().parse().unwrap();
        assert!((real - (end - start)).abs() < 0.1, "{path} lasts {real}, the list says {}", end - start);
    }
}

use std::process::Command;

#[tokio::test]
async fn a_fifty_minute_recording_is_cut_into_chunks_that_cover_it_and_fall_in_silences() {
    let dir = tempfile::tempdir().unwrap();
    // Silent from 118 to 120 s of every two minutes.
    let (source, silences) = with_silences(dir.path(), "meeting.mp3", 3000, 120);

    let work = tempfile::tempdir().unwrap();
    let fixed = transcode(&source, json!({ "max_chunk_duration": "10m" }), work.path()).await;
    let count = fixed["chunks"].as_array().unwrap().len();
    assert!((5..=6).contains(&count), "5 or 6 chunks, got {count}");
    assert!((fixed["duration"].as_f64().unwrap() - 3000.0).abs() < 0.5);
    assert_eq!(fixed["format"], "mp3");
    assert_covering(&fixed, 600.0, 24 << 20);

    let work = tempfile::tempdir().unwrap();
    let split = transcode(&source, json!({ "max_chunk_duration": "10m", "split_at_silence": true }), work.path()).await;
    assert_covering(&split, 600.0, 24 << 20);
    let cuts: Vec<f64> = chunks(&split).iter().skip(1).map(|chunk| chunk.0).collect();
    assert!((5..=6).contains(&(cuts.len() + 1)), "{cuts:?}");
    for cut in cuts {
        assert!(
            silences.iter().any(|(start, end)| cut >= *start && cut <= *end),
            "cut at {cut} falls inside a known silence"
        );
    }
}

#[tokio::test]
async fn codecs_sizes_overlap_and_passthrough() {
    let dir = tempfile::tempdir().unwrap();
    let source = tone(dir.path(), "talk.wav", 30);

    let work = tempfile::tempdir().unwrap();
    let opus =
        transcode(&source, json!({ "codec": "opus", "bitrate": "24k", "max_chunk_duration": "12s" }), work.path())
            .await;
    assert_eq!(opus["format"], "ogg", "Opus goes in an .ogg file, which the APIs accept");
    assert!(chunks(&opus).iter().all(|chunk| chunk.3.ends_with(".ogg")));
    assert_covering(&opus, 12.0, 24 << 20);

    let work = tempfile::tempdir().unwrap();
    let flac = transcode(&source, json!({ "codec": "flac", "max_chunk_bytes": "300KB" }), work.path()).await;
    assert!(chunks(&flac).len() >= 2, "the byte limit forces chunks: {flac}");
    assert_covering(&flac, 1200.0, 300_000);

    let work = tempfile::tempdir().unwrap();
    let overlapped = transcode(&source, json!({ "max_chunk_duration": "14s", "overlap": "2s" }), work.path()).await;
    let parts = chunks(&overlapped);
    assert_eq!(parts.len(), 3, "{parts:?}");
    for pair in parts.windows(2) {
        let shared = pair[0].1 - pair[1].0;
        assert!((shared - 2.0).abs() < 0.1, "chunks share about 2 s: {parts:?}");
    }
    assert!(parts.iter().all(|(start, end, ..)| end - start <= 14.0), "the overlap counts toward the limit");

    let small = tone(dir.path(), "small.mp3", 5);
    let work = tempfile::tempdir().unwrap();
    let kept = transcode(&small, json!({ "passthrough": true }), work.path()).await;
    assert_eq!(kept["passthrough"], true);
    assert_eq!(chunks(&kept)[0].3, small.to_str().unwrap(), "the file is used as it is");
}

#[tokio::test]
async fn transcode_refuses_a_file_without_audio() {
    let dir = tempfile::tempdir().unwrap();
    let silent = video(dir.path(), "silent.mp4", false);
    let work = tempfile::tempdir().unwrap();
    let error = run_stage(&TranscodeStage, job("unused", true), json!({}), transcoder_inputs(&silent), work.path())
        .await
        .unwrap_err();
    assert_eq!(error.code, ErrorCode::NoAudio);
    assert!(!error.retryable);
}

/// ffmpeg processes whose command line mentions `needle`.
fn ffmpeg_processes(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.starts_with("ffmpeg") && cmdline.contains(needle))
        .count()
}

#[tokio::test]
async fn cancelling_a_transcode_kills_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = with_silences(dir.path(), "long.mp3", 1800, 120);
    let work = tempfile::tempdir().unwrap();
    let needle = work.path().to_str().unwrap().to_string();
    let cancel = tokio_util::sync::CancellationToken::new();
    let running = {
        let (cancel, source, work) = (cancel.clone(), source.clone(), work.path().to_path_buf());
        tokio::spawn(async move {
            support::media::run_stage_with(
                &TranscodeStage,
                job("unused", true),
                json!({}),
                transcoder_inputs(&source),
                &work,
                cancel,
            )
            .await
        })
    };
    for _ in 0..200 {
        if ffmpeg_processes(&needle) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(ffmpeg_processes(&needle), 1, "ffmpeg is encoding");
    let cancelled_at = std::time::Instant::now();
    cancel.cancel();
    let error = tokio::time::timeout(std::time::Duration::from_secs(10), running).await.unwrap().unwrap().unwrap_err();
    assert_eq!(error.code, ErrorCode::Cancelled);
    assert!(cancelled_at.elapsed() < std::time::Duration::from_secs(2), "{:?}", cancelled_at.elapsed());
    assert_eq!(ffmpeg_processes(&needle), 0, "no ffmpeg is left running");
}

#[tokio::test]
async fn a_non_utf8_metadata_tag_does_not_hide_the_silences() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (source, silences) = with_silences(dir.path(), "pauses.mp3", 30, 10);
    // ffmpeg prints tags as they are: this title puts the bytes E9 and FF on its stderr, before any silence.
    let tagged = dir.path().join("tagged.wav");
    let status = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&source)
        .arg("-metadata")
        .arg(std::ffi::OsStr::from_bytes(b"title=caf\xe9 \xff"))
        .arg(&tagged)
        .status()
        .unwrap();
    assert!(status.success());
    let input = tagged.to_str().unwrap();
    let args: Vec<std::ffi::OsString> =
        ["-i", input, "-af", "silencedetect=noise=-30dB:d=1", "-f", "null", "-"].iter().map(Into::into).collect();
    let mut log = echo_worker::media::silence::SilenceLog::default();
    let mut tag_seen = false;
    let cancel = tokio_util::sync::CancellationToken::new();
    echo_worker::media::ffmpeg::run(
        &args,
        input,
        Some(30.0),
        |_| {},
        |line| {
            tag_seen |= line.contains("caf\u{fffd} \u{fffd}");
            log.feed(line);
        },
        &cancel,
    )
    .await
    .unwrap();
    assert!(tag_seen, "the tag's line is read, with U+FFFD for the bytes that are not UTF-8");
    assert_eq!(log.finish(30.0).len(), silences.len(), "every silence after the tag is still seen");
}
