//! Settings the old Node worker's deployment carries over: `MAX_FILE_SIZE_MB` counted in mebibytes as its
//! `fileHandler.js` did (a 510 MB upload it accepted is accepted), and the seed's Azure provider taking partial
//! overrides under `ai.providers.azure` (`ECHO_AI__PROVIDERS__AZURE__TRANSCRIPTION_RPM=50` alone).

mod support;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use echo_worker::config::Settings;
use echo_worker::error::ErrorCode;
use echo_worker::source::{Fetcher, SourcePolicy};
use echo_worker::stage::builtin::validate::ValidateStage;
use echo_worker::units::ByteSize;
use serde_json::json;
use support::media::{ffmpeg, job, run_stage};

/// A WAV file of `size` bytes whose header declares all of them (a few seconds of real tone, then silence),
/// written sparse so that it costs no disk.
fn declared_wav(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let spec = path.to_str().unwrap();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=2:sample_rate=48000",
        "-ac",
        "2",
        "-c:a",
        "pcm_s16le",
        spec,
    ]);
    let bytes = std::fs::read(&path).unwrap();
    let data = bytes.windows(4).position(|window| window == b"data").expect("a data chunk");
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(size).unwrap();
    file.seek(SeekFrom::Start(4)).unwrap();
    file.write_all(&u32::try_from(size - 8).unwrap().to_le_bytes()).unwrap();
    file.seek(SeekFrom::Start(data as u64 + 4)).unwrap();
    file.write_all(&u32::try_from(size - data as u64 - 8).unwrap().to_le_bytes()).unwrap();
    path
}

fn settings(pairs: &[(&str, serde_json::Value)]) -> Settings {
    let mut figment = Settings::figment(None).unwrap();
    for (key, value) in pairs {
        figment = figment.merge(figment::providers::Serialized::global(key, value));
    }
    Settings::from_figment(figment).unwrap()
}

#[tokio::test]
async fn max_file_size_mb_counts_mebibytes_so_a_510_mb_upload_the_old_worker_took_passes() {
    let limit = Settings::default().max_file_size();
    assert_eq!(limit, ByteSize(500 * 1024 * 1024), "MAX_FILE_SIZE_MB=500 is 500 MiB");
    assert_eq!(settings(&[("limits.max_file_size_mb", json!(2048))]).max_file_size(), ByteSize(2048 << 20));

    let dir = tempfile::tempdir().unwrap();
    let validator =
        ValidateStage::new(Fetcher::new(SourcePolicy { max_redirects: 5, ..SourcePolicy::default() }).unwrap(), limit);
    let run = async |path: &Path| {
        let work = tempfile::tempdir().unwrap();
        run_stage(&validator, job(path.to_str().unwrap(), true), json!({}), BTreeMap::new(), work.path()).await
    };
    let upload = declared_wav(dir.path(), "upload.wav", 510_000_000);
    let facts = run(&upload).await.expect("a 510 MB upload is under 500 MiB").value;
    assert_eq!(facts["size"], json!(510_000_000));

    let over = declared_wav(dir.path(), "over.wav", 500 * 1024 * 1024 + 1);
    let error = run(&over).await.expect_err("one byte over 500 MiB is refused");
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert!(error.message.ends_with("over the limit of 500 MiB"), "{}", error.message);
}

const ENDPOINT: &str = "https://soundscribe.openai.azure.com";

#[test]
fn one_field_under_ai_providers_azure_is_laid_over_the_seed_provider() {
    let seed = [
        ("azure_openai.endpoint", json!(format!("{ENDPOINT}/openai/deployments/x?api-version=1"))),
        ("azure_openai.api_key", json!("azure-key-0001")),
        ("azure_openai.whisper_deployment", json!("whisper-prod")),
        ("azure_openai.chat_deployment", json!("gpt-4o-mini-prod")),
    ];
    let (providers, default) = settings(&seed).providers();
    assert_eq!(providers["azure"].transcription_rpm, Some(3), "the seed keeps Azure's free-tier pace by default");

    let mut raised = seed.to_vec();
    raised.push(("ai.providers.azure.transcription_rpm", json!(50)));
    let (providers, default_raised) = settings(&raised).providers();
    let azure = &providers["azure"];
    assert_eq!(azure.transcription_rpm, Some(50), "the override wins");
    assert_eq!(azure.style, echo_worker::ai::ProviderStyle::Azure);
    assert_eq!(azure.endpoint, ENDPOINT, "the seed's endpoint, reduced to its origin");
    assert_eq!(azure.api_key.as_ref().map(|key| key.expose()), Some("azure-key-0001"));
    assert_eq!((azure.transcription_model.as_str(), azure.chat_model.as_str()), ("whisper-prod", "gpt-4o-mini-prod"));
    assert_eq!((default.as_deref(), default_raised.as_deref()), (Some("azure"), Some("azure")));

    // Without the seed's variables an override alone is still a provider missing its required fields.
    let error = Settings::from_figment(
        Settings::figment(None)
            .unwrap()
            .merge(figment::providers::Serialized::global("ai.providers.azure.transcription_rpm", 50)),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("ai.providers.azure"), "{error}");
}

#[test]
fn the_environment_variable_alone_raises_the_rate_through_the_binary() {
    let output = Command::new(env!("CARGO_BIN_EXE_echo-worker"))
        .arg("config")
        .current_dir(tempfile::tempdir().unwrap().path())
        .env("AZURE_OPENAI_ENDPOINT", ENDPOINT)
        .env("AZURE_OPENAI_API_KEY", "azure-key-0002")
        .env("ECHO_AI__PROVIDERS__AZURE__TRANSCRIPTION_RPM", "50")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: toml::Table = toml::from_str(&stdout).unwrap();
    let azure = &printed["ai"]["providers"]["azure"];
    assert_eq!(azure["transcription_rpm"].as_integer(), Some(50), "{stdout}");
    assert_eq!(azure["style"].as_str(), Some("azure"));
    assert!(!stdout.contains("azure-key-0002"), "the key is never printed");
}
