//! The shipped `loudness` command plugin (`plugins/loudness.sh`) against real ffmpeg: it must print one JSON
//! object with the loudness figures and the silences, and fail with ffmpeg's reason on a file that is not media.

use std::path::Path;
use std::process::Command;

fn ffmpeg(args: &[&str]) {
    let status = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).status().expect("ffmpeg is installed");
    assert!(status.success(), "ffmpeg {args:?}");
}

#[test]
fn reports_loudness_and_silences_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tone-then-silence.m4a");
    // 3 s of tone, 2 s of silence, 2 s of tone.
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=3",
        "-f",
        "lavfi",
        "-i",
        "anullsrc=r=44100:cl=mono:d=2",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=660:duration=2",
        "-filter_complex",
        "[0][1][2]concat=n=3:v=0:a=1",
        "-ac",
        "1",
        file.to_str().unwrap(),
    ]);
    let output = Command::new(Path::new("plugins/loudness.sh")).arg(&file).args(["-40dB", "0.5"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let integrated = report["integrated_lufs"].as_f64().expect("integrated loudness is a number");
    assert!((-40.0..0.0).contains(&integrated), "{report}");
    assert!(report["true_peak_dbtp"].as_f64().is_some(), "{report}");
    assert_eq!(report["silence_threshold"], "-40dB");
    let silences = report["silences"].as_array().unwrap();
    assert_eq!(silences.len(), 1, "{report}");
    let (start, end) = (silences[0]["start"].as_f64().unwrap(), silences[0]["end"].as_f64().unwrap());
    assert!((start - 3.0).abs() < 0.1 && (end - 5.0).abs() < 0.1, "silence is 3 s to 5 s: {report}");
}

#[test]
fn fails_with_ffmpegs_reason_on_non_media() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.mp3");
    std::fs::write(&file, "this is text, not audio\n".repeat(100)).unwrap();
    let output = Command::new(Path::new("plugins/loudness.sh")).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("notes.mp3"), "ffmpeg says what it could not read: {stderr}");
}
