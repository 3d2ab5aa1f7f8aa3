//! The `echo-worker` binary end to end: exit codes, output formats, settings and secrets, as a user or a
//! tool calling it sees them.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn echo_worker(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo-worker"));
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    // The developer's own settings must not leak into the tests.
    for (name, _) in std::env::vars() {
        if name.starts_with("ECHO_") || name.starts_with("AZURE_") || name.starts_with("SUPABASE_") {
            command.env_remove(name);
        }
    }
    for name in
        ["PORT", "REDIS_URL", "NODE_ENV", "LOG_LEVEL", "RUST_LOG", "WORKER_CONCURRENCY", "PROCESSING_TIMEOUT_MS"]
    {
        command.env_remove(name);
    }
    // Each run gets a private in-memory database unless a test points it at a file.
    command.env("DATABASE_URL", "sqlite::memory:");
    command
}

fn run(command: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = command.output().expect("the binary runs");
    (status.code().unwrap_or(-1), String::from_utf8_lossy(&stdout).into(), String::from_utf8_lossy(&stderr).into())
}

#[test]
fn validate_lists_every_shipped_pipeline_in_stage_order() {
    let (code, stdout, stderr) = run(&mut echo_worker(&["validate"]));
    assert_eq!(code, 0, "{stderr}");
    for name in ["audio-qa", "default", "meeting", "podcast", "transcribe-only"] {
        assert!(stdout.contains(&format!("{name} (pipelines/{name}.toml)")), "{name} listed in:\n{stdout}");
    }
    let default = stdout.split("default (").nth(1).unwrap();
    let order: Vec<usize> = ["validate", "download", "transcode", "transcript", "analysis", "persist"]
        .iter()
        .map(|stage| default.find(&format!(". {stage} ")).unwrap_or_else(|| panic!("{stage} in {default}")))
        .collect();
    assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "stages in order: {default}");
}

#[test]
fn validate_exits_1_and_lists_every_error_with_its_position() {
    let (code, stdout, stderr) =
        run(&mut echo_worker(&["validate", "--pipelines", "tests/fixtures/pipelines/invalid", "--plugins", "plugins"]));
    assert_eq!(code, 1);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("tests/fixtures/pipelines/invalid/cycle.toml:5:10: dependency cycle: a -> b -> c -> a"),
        "{stderr}"
    );
    assert!(stderr.contains("tests/fixtures/pipelines/invalid/syntax.toml:3:17: invalid TOML"), "{stderr}");
    let expected: usize = echo_worker::document::toml_files(Path::new("tests/fixtures/pipelines/invalid"))
        .unwrap()
        .iter()
        .map(|file| std::fs::read_to_string(file.with_extension("expected")).unwrap().lines().count())
        .sum();
    assert!(stderr.contains(&format!("{expected} problems in")), "all {expected} problems counted:\n{stderr}");
}

#[test]
fn validate_json_is_machine_readable() {
    let (code, stdout, _) = run(&mut echo_worker(&[
        "validate",
        "--format",
        "json",
        "--pipelines",
        "pipelines",
        "--plugins",
        "tests/fixtures/plugins/invalid",
    ]));
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is one JSON document");
    assert_eq!(report["valid"], false);
    let errors = report["errors"].as_array().unwrap();
    let kind = errors
        .iter()
        .find(|e| e["code"] == "invalid_value" && e["file"].as_str().unwrap().ends_with("unknown-kind.toml"));
    let kind = kind.expect("the unknown plugin kind is reported");
    assert_eq!((kind["line"].as_u64(), kind["column"].as_u64()), (Some(2), Some(8)));
    // Pipelines that use the shipped plugins now fail because those plugins are not in this folder.
    assert!(errors.iter().any(|e| e["code"] == "unknown_kind"), "{stdout}");

    let (code, stdout, _) = run(&mut echo_worker(&["validate", "--format", "json"]));
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!(report["pipelines"].as_array().unwrap().len(), 5);
    assert_eq!(report["pipelines"][1]["stages"][3]["uses"], "whisper");
}

#[test]
fn validate_reports_a_missing_folder() {
    let (code, _, stderr) = run(&mut echo_worker(&["validate", "--pipelines", "no/such/dir"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read no/such/dir"), "{stderr}");
}

#[test]
fn a_missing_folder_says_no_such_file_once() {
    let (code, _, stderr) = run(&mut echo_worker(&["validate", "--pipelines", "no/such/dir"]));
    assert_eq!(code, 1);
    assert_eq!(stderr.trim(), "error: cannot read no/such/dir: No such file or directory (os error 2)");
    let (code, _, stderr) = run(&mut echo_worker(&["process", "samples/hello.wav", "--pipelines", "no/such/dir"]));
    assert_eq!(code, 1);
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn graph_dot_is_accepted_by_graphviz() {
    let (code, dot, stderr) = run(&mut echo_worker(&["graph", "meeting", "--format", "dot"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(dot.contains("\"transcript\" -> \"action_items\";"), "{dot}");
    let mut graphviz = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("graphviz `dot` is installed (.ci/run installs it)");
    std::io::Write::write_all(graphviz.stdin.as_mut().unwrap(), dot.as_bytes()).unwrap();
    let output = graphviz.wait_with_output().unwrap();
    assert!(output.status.success(), "dot refused the graph: {}", String::from_utf8_lossy(&output.stderr));
    let svg = String::from_utf8_lossy(&output.stdout);
    assert_eq!(svg.matches("class=\"node\"").count(), 7, "one SVG node per stage");
    assert_eq!(svg.matches("class=\"edge\"").count(), 8, "one SVG edge per need");
}

#[test]
fn graph_mermaid_lists_nodes_and_edges() {
    let (code, mermaid, _) = run(&mut echo_worker(&["graph", "default", "--format", "mermaid"]));
    assert_eq!(code, 0);
    let lines: Vec<&str> = mermaid.lines().collect();
    assert_eq!(lines[0], "flowchart LR");
    assert!(lines.contains(&"  s_transcript[\"transcript<br/><i>whisper</i>\"]"), "{mermaid}");
    assert!(lines.contains(&"  s_transcode --> s_transcript"), "{mermaid}");
    assert_eq!(lines.iter().filter(|line| line.contains("-->")).count(), 6);
}

#[test]
fn graph_of_an_unknown_pipeline_names_the_known_ones() {
    let (code, _, stderr) = run(&mut echo_worker(&["graph", "meetin"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("no pipeline named `meetin`"), "{stderr}");
    assert!(stderr.contains("meeting"), "{stderr}");
}

#[test]
fn schema_writes_the_checked_in_files() {
    let out = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(&mut echo_worker(&["schema", "--out", out.path().to_str().unwrap()]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("pipeline.schema.json"));
    for name in ["pipeline.schema.json", "plugin.schema.json"] {
        let written = std::fs::read_to_string(out.path().join(name)).unwrap();
        let checked_in = std::fs::read_to_string(Path::new("schema").join(name)).unwrap();
        assert_eq!(written, checked_in, "{name}");
    }
}

#[test]
fn every_command_has_help() {
    for args in
        [&["--help"][..], &["validate", "--help"], &["graph", "--help"], &["schema", "--help"], &["config", "--help"]]
    {
        let (code, stdout, _) = run(&mut echo_worker(args));
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage: echo-worker"), "{args:?}: {stdout}");
    }
    let (code, _, stderr) = run(&mut echo_worker(&["frobnicate"]));
    assert_eq!(code, 2, "unknown commands are usage errors");
    assert!(stderr.contains("unrecognized subcommand"), "{stderr}");
}

const SECRETS: [&str; 7] = [
    "sk-azure-secret-0001",
    "whisper-secret-0002",
    "service-role-secret-0003",
    "redis-password-0004",
    "file-secret-0005",
    "sk-openai-secret-0006",
    "database-password-0007",
];

#[test]
fn config_prints_effective_settings_without_any_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.toml");
    std::fs::write(
        &file,
        "log_level = \"debug\"\n[paths]\npipelines = \"/srv/pipelines\"\n[azure_openai]\nwhisper_api_key = \"whisper-secret-0002\"\napi_key = \"file-secret-0005\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["--config", file.to_str().unwrap(), "config"])
        .env("PORT", "4100")
        .env("NODE_ENV", "production")
        .env("AZURE_OPENAI_API_KEY", SECRETS[0])
        .env("SUPABASE_SERVICE_ROLE_KEY", SECRETS[2])
        .env("SUPABASE_URL", "https://project.supabase.co")
        .env("REDIS_URL", format!("redis://default:{}@cache:6379/0", SECRETS[3]))
        .env("WORKER_CONCURRENCY", "7")
        .env("PROCESSING_TIMEOUT_MS", "600000")
        .env("ALLOWED_ORIGINS", "https://a.example, https://b.example")
        .env("AZURE_OPENAI_ENDPOINT", "https://res.openai.azure.com/openai/deployments/whisper?api-version=2024-06-01")
        .env("ECHO_LIMITS__MAX_FILE_SIZE_MB", "2048")
        .env("ECHO_AI__PROVIDERS__OPENAI__STYLE", "openai")
        .env("ECHO_AI__PROVIDERS__OPENAI__ENDPOINT", "https://api.openai.com/v1")
        .env("ECHO_AI__PROVIDERS__OPENAI__API_KEY", SECRETS[5])
        .env("DATABASE_URL", format!("postgres://app:{}@db.example:5432/app", SECRETS[6]))
        .env("RUST_LOG", "trace"));
    assert_eq!(code, 0, "{stderr}");
    for secret in SECRETS {
        assert!(!stdout.contains(secret), "stdout leaks {secret}:\n{stdout}");
        assert!(!stderr.contains(secret), "stderr leaks {secret}:\n{stderr}");
    }
    let settings: toml::Table = toml::from_str(&stdout).expect("config prints TOML");
    assert_eq!(settings["environment"].as_str(), Some("production"));
    assert_eq!(settings["log_level"].as_str(), Some("debug"), "from the --config file");
    assert_eq!(settings["server"]["port"].as_integer(), Some(4100), "PORT beats the default");
    assert_eq!(settings["paths"]["pipelines"].as_str(), Some("/srv/pipelines"));
    assert_eq!(settings["worker"]["concurrency"].as_integer(), Some(7));
    assert_eq!(settings["worker"]["processing_timeout_ms"].as_integer(), Some(600_000));
    assert_eq!(settings["limits"]["max_file_size_mb"].as_integer(), Some(2048), "ECHO_ nested names work");
    assert_eq!(settings["server"]["allowed_origins"].as_array().unwrap().len(), 2);
    assert_eq!(settings["azure_openai"]["api_key"].as_str(), Some("[redacted]"), "the environment beats the file");
    assert_eq!(settings["azure_openai"]["whisper_api_key"].as_str(), Some("[redacted]"));
    assert_eq!(settings["supabase"]["service_role_key"].as_str(), Some("[redacted]"));
    assert_eq!(settings["redis"]["url"].as_str(), Some("redis://default:[redacted]@cache:6379/0"));
    assert_eq!(settings["azure_openai"]["endpoint"].as_str(), Some("https://res.openai.azure.com"));
    assert_eq!(settings["ai"]["providers"]["openai"]["api_key"].as_str(), Some("[redacted]"));
    assert_eq!(settings["database"]["url"].as_str(), Some("postgres://app:[redacted]@db.example:5432/app"));
    assert!(stderr.contains("using its origin https://res.openai.azure.com"), "the fix is announced: {stderr}");
}

#[test]
fn config_never_prints_a_password_with_a_slash_or_endpoint_credentials() {
    const MARKER: &str = "marker-secret-5a";
    let (code, stdout, stderr) = run(echo_worker(&["config"])
        .env("REDIS_URL", format!("redis://default:pa/ss-{MARKER}@cache:6379/0"))
        .env("DATABASE_URL", format!("postgres://app:x/{MARKER}@db.example:5432/app"))
        .env(
            "AZURE_OPENAI_ENDPOINT",
            format!("https://user:{MARKER}@res.openai.azure.com/openai/deployments/w?api-version=1"),
        )
        .env("AZURE_OPENAI_WHISPER_ENDPOINT", format!("https://user:pa/ss-{MARKER}@whisper.example"))
        .env("SUPABASE_URL", format!("https://{MARKER}@project.supabase.co"))
        .env("ECHO_AI__PROVIDERS__LOCAL__STYLE", "openai")
        .env("ECHO_AI__PROVIDERS__LOCAL__ENDPOINT", format!("http://tok-{MARKER}@127.0.0.1:8000/v1?key={MARKER}"))
        .env("RUST_LOG", "trace"));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains(MARKER), "stdout leaks the secret:\n{stdout}");
    assert!(!stderr.contains(MARKER), "stderr leaks the secret:\n{stderr}");
    let settings: toml::Table = toml::from_str(&stdout).expect("config prints TOML");
    assert_eq!(settings["redis"]["url"].as_str(), Some("[redacted]"), "an unparseable URL prints as nothing");
    assert_eq!(settings["azure_openai"]["endpoint"].as_str(), Some("https://res.openai.azure.com"));
    assert_eq!(settings["supabase"]["url"].as_str(), Some("https://[redacted]@project.supabase.co/"));
    assert_eq!(
        settings["ai"]["providers"]["local"]["endpoint"].as_str(),
        Some("http://[redacted]@127.0.0.1:8000/v1?[redacted]")
    );
    assert!(stderr.contains("using its origin https://res.openai.azure.com "), "the fix is announced: {stderr}");
}

#[test]
fn a_keyword_database_url_is_not_echoed_in_its_error() {
    const MARKER: &str = "marker-secret-5b";
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    for url in [format!("host=db.example user=app password={MARKER} dbname=app"), format!("{MARKER}:x")] {
        let (code, stdout, stderr) =
            run(echo_worker(&["process", file.to_str().unwrap()]).args(LOUDNESS_ONLY).env("DATABASE_URL", &url));
        assert_eq!(code, 1, "{stderr}");
        assert!(!stdout.contains(MARKER) && !stderr.contains(MARKER), "the secret leaks:\n{stdout}\n{stderr}");
        assert!(stderr.contains("DATABASE_URL must be a URL starting with sqlite: or postgres://"), "{stderr}");
    }
}

#[test]
fn config_defaults_need_no_file_and_no_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["config"]).current_dir(dir.path()));
    assert_eq!(code, 0, "{stderr}");
    let settings: toml::Table = toml::from_str(&stdout).unwrap();
    assert_eq!(settings["server"]["port"].as_integer(), Some(3001));
    assert_eq!(settings["environment"].as_str(), Some("development"));
    assert!(settings["redis"].get("url").is_none(), "no Redis unless configured");
}

#[test]
fn config_reports_bad_values_and_missing_files() {
    let (code, _, stderr) = run(echo_worker(&["config"]).env("PORT", "not-a-port"));
    assert_eq!(code, 1);
    assert!(stderr.contains("server.port"), "names the setting: {stderr}");
    let (code, _, stderr) = run(&mut echo_worker(&["--config", "missing.toml", "config"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("config file missing.toml does not exist"), "{stderr}");
}

fn tone(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("tone.m4a");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=2"])
        .args(["-f", "lavfi", "-i", "anullsrc=r=44100:cl=mono:d=1", "-filter_complex", "[0][1]concat=n=2:v=0:a=1"])
        .arg(&file)
        .status()
        .expect("ffmpeg is installed");
    assert!(status.success());
    file
}

const LOUDNESS_ONLY: [&str; 4] = ["--pipeline", "loudness-only", "--pipelines", "tests/fixtures/pipelines/process"];

#[test]
fn process_prints_a_loudness_report_for_generated_audio() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let (code, stdout, stderr) =
        run(echo_worker(&["process", file.to_str().unwrap(), "--format", "json"]).args(LOUDNESS_ONLY));
    assert_eq!(code, 0, "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON report");
    assert_eq!(document["report"]["status"], "succeeded");
    let loudness = &document["report"]["stages"]["loudness"]["output"];
    assert!(loudness["integrated_lufs"].as_f64().is_some(), "{loudness}");
    assert_eq!(loudness["silences"].as_array().unwrap().len(), 1, "{loudness}");
}

#[test]
fn process_fails_on_a_text_file_named_mp3_and_names_the_stage() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("song.mp3");
    std::fs::write(&fake, "this is not audio\n".repeat(50)).unwrap();
    let out = dir.path().join("reports");
    let (code, _, stderr) =
        run(echo_worker(&["process", fake.to_str().unwrap(), "--out", out.to_str().unwrap()]).args(LOUDNESS_ONLY));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("song.mp3: failed in stage `loudness`: plugin `loudness` exited with status 1"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("song.json")).unwrap()).unwrap();
    assert_eq!(report["report"]["failure"]["stage"], "loudness");
}

#[test]
fn process_refuses_before_any_work_what_cannot_run_here() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let (code, stdout, stderr) = run(&mut echo_worker(&["process", file.to_str().unwrap()]));
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains(
            "pipeline `default` needs an AI provider for `transcript` (whisper), `analysis` (analyze): set AZURE_OPENAI_ENDPOINT"
        ),
        "{stderr}"
    );
    let (code, _, stderr) = run(echo_worker(&["process", "no/such/file.mp3"]).args(LOUDNESS_ONLY));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read no/such/file.mp3"), "{stderr}");
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn an_unknown_pipeline_suggests_the_closest_name() {
    let (code, stdout, stderr) = run(&mut echo_worker(&["process", "samples/hello.wav", "--pipeline", "audio_qa"]));
    assert_eq!(code, 1);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("no pipeline named `audio_qa`; did you mean `audio-qa`?"), "{stderr}");
    let (code, _, stderr) = run(&mut echo_worker(&["graph", "meetin"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("did you mean `meeting`?"), "{stderr}");
}

#[test]
fn process_ends_with_a_short_summary_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let fake = dir.path().join("song.mp3");
    std::fs::write(&fake, "this is not audio\n".repeat(50)).unwrap();
    let out = dir.path().join("reports");
    let (code, stdout, stderr) = run(echo_worker(&["process", file.to_str().unwrap(), fake.to_str().unwrap()]).args([
        "--pipeline",
        "audio-qa",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).is_err(), "a summary, not JSON: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let first = lines.iter().position(|line| line.starts_with(&format!("{}: completed in ", file.display())));
    let first = first.unwrap_or_else(|| panic!("the tone completed:\n{stdout}"));
    assert!(lines[first].ends_with(" s (audio-qa)"), "{stdout}");
    let block = lines[first + 1..].iter().take_while(|line| line.starts_with("  ")).copied().collect::<Vec<_>>();
    assert!(
        block.iter().any(|line| line.starts_with("  recording: 3.0 s, audio/mp4, ") && line.ends_with(" KB")),
        "{stdout}"
    );
    assert!(block.iter().any(|line| line.starts_with("  loudness: integrated_lufs -")), "{stdout}");
    assert!(block.iter().any(|line| line.starts_with("  transcode: chunks 1, duration 3.0 s")), "{stdout}");
    assert!(block.contains(&format!("  report: {}", out.join("tone.json").display()).as_str()), "{stdout}");
    assert!(block.iter().any(|line| line.starts_with("  stored: recording ")), "{stdout}");
    assert!(out.join("tone.json").exists() && out.join("song.json").exists());
    assert!(
        stdout.contains(&format!("{}: failed in stage `validate` after ", fake.display())),
        "the failed file is summed up too:\n{stdout}"
    );
    assert!(stderr.contains("song.mp3: failed in stage `validate`: the file is not audio or video"), "{stderr}");
}

#[test]
fn sigterm_cancels_process_and_kills_the_running_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let pid_dir = dir.path().join("pids");
    std::fs::create_dir(&pid_dir).unwrap();
    let child = echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "sleep"])
        .args(["--pipelines", "tests/fixtures/pipelines/signal", "--plugins", "tests/fixtures/plugins/valid"])
        .arg("--param")
        .arg(format!("pid_dir={}", pid_dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let leader = pid_dir.join("leader");
    for _ in 0..400 {
        if leader.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let leader: i32 = std::fs::read_to_string(&leader).expect("the plugin started").trim().parse().unwrap();
    let sent = std::time::Instant::now();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let output = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(took < std::time::Duration::from_secs(5), "exited {took:?} after SIGTERM");
    assert!(!Path::new(&format!("/proc/{leader}")).exists() || is_zombie(leader), "plugin process {leader} is gone");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
}

#[test]
fn process_audio_qa_leaves_a_completed_row_with_the_loudness_report() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let database = format!("sqlite://{}", dir.path().join("echo.db").display());
    let (code, stdout, stderr) =
        run(echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "audio-qa", "--format", "json"])
            .env("DATABASE_URL", &database));
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let id = report["recording_id"].as_str().unwrap().to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let row = runtime.block_on(async {
        use echo_worker::store::Store;
        let store = echo_worker::store::SqlStore::connect(&database, "recordings").await.unwrap();
        store.get(&id).await.unwrap().expect("the recording row exists")
    });
    assert_eq!(row.status, echo_worker::store::RecordingStatus::Completed);
    assert_eq!(row.progress, 100);
    assert_eq!(row.pipeline.as_deref(), Some("audio-qa"));
    assert_eq!(row.mime_type.as_deref(), Some("audio/mp4"), "validate's facts reach the row");
    assert!((row.duration_s.unwrap() - 3.0).abs() < 0.1);
    let result = row.result.expect("a result");
    assert!(result["loudness"]["integrated_lufs"].as_f64().is_some(), "{result}");
    assert_eq!(result["chunks"], 1);
    assert!((result["duration"].as_f64().unwrap() - 3.0).abs() < 0.1, "{result}");
}

#[test]
fn the_embedded_defaults_match_the_shipped_folders() {
    let mut shipped: Vec<(String, String)> = ["pipelines", "plugins"]
        .iter()
        .flat_map(|folder| {
            std::fs::read_dir(folder)
                .unwrap()
                .map(move |entry| format!("{folder}/{}", entry.unwrap().file_name().to_string_lossy()))
        })
        .map(|name| (name.clone(), std::fs::read_to_string(&name).unwrap()))
        .collect();
    shipped.sort();
    let mut embedded: Vec<(String, String)> =
        echo_worker::defaults::FILES.iter().map(|(name, text)| (name.to_string(), text.to_string())).collect();
    embedded.sort();
    assert_eq!(embedded, shipped, "src/defaults.rs lists every shipped file, as it is");
}

#[test]
fn an_empty_folder_runs_on_the_embedded_defaults() {
    let cwd = tempfile::tempdir().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["validate"]).current_dir(cwd.path()).env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("5 pipelines and 7 plugins are valid"), "{stdout}");
    let file = tone(cwd.path());
    let (code, stdout, stderr) = run(echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "audio-qa"])
        .args(["--format", "json"])
        .current_dir(cwd.path())
        .env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let loudness = &report["report"]["stages"]["loudness"]["output"];
    assert!(loudness["integrated_lufs"].as_f64().is_some(), "the unpacked loudness.sh ran: {stdout}");
    assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 0, "the unpacked files are removed at exit");
}

#[test]
fn an_unrelated_plugins_folder_does_not_turn_off_the_embedded_pipelines() {
    let cwd = tempfile::tempdir().unwrap();
    let temp = tempfile::tempdir().unwrap();
    std::fs::create_dir(cwd.path().join("plugins")).unwrap();
    std::fs::write(cwd.path().join("plugins/README.txt"), "my editor's plugins\n").unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["validate"]).current_dir(cwd.path()).env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("5 pipelines and 7 plugins are valid"), "{stdout}");
    // A folder of real pipelines is used as it is, with the embedded plugins next to it.
    std::fs::create_dir(cwd.path().join("pipelines")).unwrap();
    std::fs::copy("pipelines/audio-qa.toml", cwd.path().join("pipelines/audio-qa.toml")).unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["validate"]).current_dir(cwd.path()).env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("1 pipelines and 7 plugins are valid"), "{stdout}");
}

/// The old, predictable place of the unpacked defaults, as another local user could prepare it.
fn old_shared_path(temp: &Path) -> std::path::PathBuf {
    temp.join(format!("echo-worker-{}-defaults", env!("CARGO_PKG_VERSION")))
}

#[test]
fn defaults_do_not_trust_files_planted_in_the_old_shared_path() {
    use std::os::unix::fs::PermissionsExt as _;
    let cwd = tempfile::tempdir().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let old = old_shared_path(temp.path());
    for folder in ["pipelines", "plugins"] {
        std::fs::create_dir_all(old.join(folder)).unwrap();
    }
    std::fs::write(old.join("pipelines/planted.toml"), "name = \"planted\"\n[stages.v]\nuses = \"validate\"\n")
        .unwrap();
    std::fs::write(
        old.join("plugins/planted.toml"),
        "name = \"planted\"\nkind = \"command\"\n[command]\nprogram = \"planted.sh\"\n",
    )
    .unwrap();
    // World-writable and, where the tests may give files away, owned by someone else.
    for path in [old.clone(), old.join("pipelines"), old.join("plugins")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        }
    }
    let (code, stdout, stderr) = run(echo_worker(&["validate"]).current_dir(cwd.path()).env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("5 pipelines and 7 plugins are valid"), "only the embedded files: {stdout}");
    assert!(!stdout.contains("planted"), "{stdout}");
}

#[test]
fn defaults_refuse_a_planted_symlink() {
    use std::os::unix::fs::PermissionsExt as _;
    let cwd = tempfile::tempdir().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let victim = cwd.path().join("victim.txt");
    std::fs::write(&victim, "the victim's own file\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).unwrap();
    let old = old_shared_path(temp.path());
    std::fs::create_dir_all(old.join("plugins")).unwrap();
    std::os::unix::fs::symlink(&victim, old.join("plugins/loudness.sh")).unwrap();
    let file = tone(cwd.path());
    let (code, _, stderr) = run(echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "audio-qa"])
        .current_dir(cwd.path())
        .env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "the victim's own file\n", "not written through the link");
    assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o640, "not chmod-ed");
}

#[test]
fn defaults_run_the_embedded_plugin_script_not_a_planted_one() {
    use std::os::unix::fs::PermissionsExt as _;
    let cwd = tempfile::tempdir().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let marker = cwd.path().join("planted-script-ran");
    let old = old_shared_path(temp.path());
    for (name, text) in echo_worker::defaults::FILES {
        std::fs::create_dir_all(old.join(name).parent().unwrap()).unwrap();
        std::fs::write(old.join(name), text).unwrap();
    }
    let planted = format!("#!/bin/sh\ntouch '{}'\necho '{{\"integrated_lufs\": 99}}'\n", marker.display());
    std::fs::write(old.join("plugins/loudness.sh"), planted).unwrap();
    std::fs::set_permissions(old.join("plugins/loudness.sh"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = tone(cwd.path());
    let (code, stdout, stderr) = run(echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "audio-qa"])
        .args(["--format", "json"])
        .current_dir(cwd.path())
        .env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(!marker.exists(), "the planted script ran");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let loudness = &report["report"]["stages"]["loudness"]["output"];
    assert!(loudness["integrated_lufs"].as_f64().is_some_and(|lufs| lufs < 0.0), "{loudness}");
    assert!(loudness["silences"].is_array(), "the embedded script's full output: {loudness}");
}

#[test]
fn the_readme_quick_start_works_on_the_shipped_sample() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let quick_start = readme.split("## Quick start").nth(1).unwrap().split("\n## ").next().unwrap();
    let command = quick_start
        .lines()
        .find_map(|line| line.strip_prefix("cargo run -- "))
        .expect("the Quick start runs `cargo run -- …`");
    let args: Vec<&str> = command.split('#').next().unwrap().split_whitespace().collect();
    assert_eq!(args[0], "process", "{command}");
    let sample = Path::new(args[1]);
    let size = std::fs::metadata(sample).unwrap_or_else(|e| panic!("{} is shipped: {e}", sample.display())).len();
    assert!(size < 200_000, "{} is small: {size} bytes", sample.display());
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("echo.db").display());
    let (code, stdout, stderr) = run(echo_worker(&args).env("DATABASE_URL", &database));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with(&format!("{}: completed in ", sample.display())), "{stdout}");
    assert!(stdout.contains("  loudness: integrated_lufs -"), "{stdout}");
    let id = stdout.split("stored: recording ").nth(1).and_then(|rest| rest.split(' ').next()).unwrap().to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let row = runtime.block_on(async {
        use echo_worker::store::Store;
        let store = echo_worker::store::SqlStore::connect(&database, "recordings").await.unwrap();
        store.get(&id).await.unwrap().expect("the recording row exists")
    });
    assert_eq!(row.status, echo_worker::store::RecordingStatus::Completed);
    let seconds = row.duration_s.unwrap();
    assert!((2.0..10.0).contains(&seconds), "a few seconds long: {seconds}");
    assert_eq!(row.result.unwrap()["loudness"]["silences"].as_array().map(Vec::len), Some(1), "one pause");
}

/// Every process below `root`, from /proc: `(pid, command name)`.
fn descendants(root: i32) -> Vec<(i32, String)> {
    let mut table = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_string();
        let parent = stat[close + 1..].split_whitespace().nth(1).and_then(|ppid| ppid.parse::<i32>().ok());
        table.push((pid, parent.unwrap_or(0), name));
    }
    let mut found: Vec<(i32, String)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid, name) in &table {
            if *ppid == parent && !found.iter().any(|(seen, _)| seen == pid) {
                found.push((*pid, name.clone()));
                frontier.push(*pid);
            }
        }
    }
    found
}

fn is_gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid)
}

/// Starts `process` with `args`, waits until `ready` holds for the worker's descendants, kills the worker with
/// SIGKILL and checks that every one of them is gone within 5 s. Returns the descendants that were running.
fn kill_9_takes_every_child_along(args: &[&str], ready: impl Fn(&[(i32, String)]) -> bool) -> Vec<(i32, String)> {
    let mut worker = echo_worker(&["process"]).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let pid = i32::try_from(worker.id()).unwrap();
    let mut running = Vec::new();
    for _ in 0..600 {
        running = descendants(pid);
        if ready(&running) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(ready(&running), "the job got going: {running:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    worker.wait().unwrap();
    for _ in 0..100 {
        if running.iter().all(|(pid, _)| is_gone(*pid)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left: Vec<_> = running.iter().filter(|(pid, _)| !is_gone(*pid)).collect();
    // Whatever survived is killed here, so that a failing run leaves nothing behind either.
    for (pid, _) in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
    }
    assert!(left.is_empty(), "still running after kill -9 of the worker: {left:?} (of {running:?})");
    running
}

#[test]
fn kill_9_of_process_leaves_no_plugin_process_or_grandchild_running() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let pid_dir = dir.path().join("pids");
    std::fs::create_dir(&pid_dir).unwrap();
    let param = format!("pid_dir={}", pid_dir.display());
    let child = pid_dir.join("child");
    let args = [file.to_str().unwrap(), "--pipeline", "sleep", "--pipelines", "tests/fixtures/pipelines/signal"];
    let plugins = ["--plugins", "tests/fixtures/plugins/valid", "--param", &param];
    let running = kill_9_takes_every_child_along(&[&args[..], &plugins[..]].concat(), |_| child.exists());
    let sleeper: i32 = std::fs::read_to_string(&child).unwrap().trim().parse().unwrap();
    assert!(running.iter().any(|(pid, _)| *pid == sleeper), "the plugin's `sleep 60` was checked: {running:?}");
}

#[test]
fn kill_9_of_process_leaves_no_ffmpeg_running() {
    let dir = tempfile::tempdir().unwrap();
    // An hour of silence: small to write, a minute or more for the loudness plugin's ffmpeg to measure. That
    // ffmpeg is a grandchild (the plugin script starts it) and writes to no pipe of the worker, so nothing but
    // the worker's own measures can stop it.
    let file = dir.path().join("hour.flac");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "3600", "-c:a", "flac"])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    let args = [&[file.to_str().unwrap()][..], &LOUDNESS_ONLY[..]].concat();
    let running = kill_9_takes_every_child_along(&args, |running| running.iter().any(|(_, name)| name == "ffmpeg"));
    assert!(running.iter().any(|(_, name)| name == "ffmpeg"), "{running:?}");
}

#[test]
fn a_result_the_store_refuses_fails_the_file_instead_of_leaving_it_processing() {
    use echo_worker::store::{RecordingStatus, SqlStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let database = format!("sqlite://{}", dir.path().join("echo.db").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The store refuses to mark any row completed, as it refused a 1 GB result in the report that found this.
    runtime.block_on(async {
        let store = SqlStore::connect(&database, "recordings").await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_results BEFORE UPDATE ON recordings WHEN NEW.status = 'completed' \
             BEGIN SELECT RAISE(ABORT, 'the result is too large'); END",
        )
        .execute(store.pool())
        .await
        .unwrap();
    });
    let (code, _, stderr) =
        run(echo_worker(&["process", file.to_str().unwrap()]).args(LOUDNESS_ONLY).env("DATABASE_URL", &database));
    assert_eq!(code, 1, "the command says the file failed: {stderr}");
    assert!(stderr.contains("could not record the result") && stderr.contains("the result is too large"), "{stderr}");
    let row = runtime.block_on(async {
        let store = SqlStore::connect(&database, "recordings").await.unwrap();
        let id: String = sqlx::query_scalar("SELECT id FROM recordings").fetch_one(store.pool()).await.unwrap();
        store.get(&id).await.unwrap().unwrap()
    });
    assert_eq!(row.status, RecordingStatus::Failed, "{row:?}");
    assert!(row.error.as_deref().unwrap_or_default().contains("could not record the result"), "{row:?}");
}

#[test]
fn one_job_failing_early_in_process_leaves_the_other_to_complete() {
    use echo_worker::store::{RecordingStatus, SqlStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let good = tone(dir.path());
    let bad = dir.path().join("bad.m4a");
    std::fs::copy(&good, &bad).unwrap();
    let database = format!("sqlite://{}", dir.path().join("echo.db").display());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The store refuses to start `bad.m4a`, which makes that job fail before it runs.
    runtime.block_on(async {
        let store = SqlStore::connect(&database, "recordings").await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_bad BEFORE UPDATE ON recordings \
             WHEN NEW.status = 'processing' AND NEW.file_name = 'bad.m4a' \
             BEGIN SELECT RAISE(ABORT, 'bad.m4a may not start'); END",
        )
        .execute(store.pool())
        .await
        .unwrap();
    });
    let (code, stdout, stderr) =
        run(echo_worker(&["process", "--format", "json", good.to_str().unwrap(), bad.to_str().unwrap()])
            .args(LOUDNESS_ONLY)
            .env("DATABASE_URL", &database));
    let rows = runtime.block_on(async {
        let store = SqlStore::connect(&database, "recordings").await.unwrap();
        let mut rows = Vec::new();
        for id in sqlx::query_scalar::<_, String>("SELECT id FROM recordings").fetch_all(store.pool()).await.unwrap() {
            rows.push(store.get(&id).await.unwrap().unwrap());
        }
        rows
    });
    assert_eq!(rows.len(), 2);
    for row in rows {
        let expected = if row.file_name.as_deref() == Some("bad.m4a") {
            assert!(row.error.as_deref().unwrap_or_default().contains("bad.m4a may not start"), "{row:?}");
            RecordingStatus::Failed
        } else {
            RecordingStatus::Completed
        };
        assert_eq!(row.status, expected, "{row:?}");
    }
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bad.m4a: failed: ") && stderr.contains("bad.m4a may not start"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("the good file's report");
    assert_eq!(report["report"]["status"], "succeeded", "{report}");
}

#[test]
fn a_non_utf8_file_name_is_refused_clearly_not_a_panic() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(std::ffi::OsStr::from_bytes(b"tone-\xff.m4a"));
    std::fs::rename(tone(dir.path()), &file).unwrap();
    let (code, stdout, stderr) = run(echo_worker(&["process"]).arg(&file).args(LOUDNESS_ONLY));
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("tone-\u{fffd}.m4a: the path is not valid UTF-8; rename the file"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn a_closed_stdout_ends_the_output_quietly_instead_of_panicking() {
    for args in [&["validate"][..], &["config"], &["graph", "meeting"], &["validate", "--format", "json"]] {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let output = echo_worker(args).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: nothing on stderr either: {stderr}");
    }
}

#[test]
fn control_characters_in_ids_and_keys_are_escaped_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("evil.toml"),
        "name = \"evil\"\n[stages.\"a\\u001b[2J\"]\nuses = \"validate\"\n\"\\u001b]0;owned\\u0007\" = 1\n",
    )
    .unwrap();
    let (code, _, stderr) =
        run(&mut echo_worker(&["validate", "--pipelines", dir.path().to_str().unwrap(), "--plugins", "plugins"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\u{7}'), "raw control characters: {stderr:?}");
    assert!(stderr.contains("invalid stage id `a\\u{1b}[2J`"), "{stderr}");
    assert!(stderr.contains("unknown key `stages.a\\u{1b}[2J.\\u{1b}]0;owned\\u{7}`"), "{stderr}");
}

#[test]
fn the_loudness_plugin_refuses_a_silence_threshold_that_is_not_a_level() {
    let dir = tempfile::tempdir().unwrap();
    let file = tone(dir.path());
    let output = Command::new("plugins/loudness.sh").arg(&file).arg("-30dB,amovie=/etc/passwd").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("silence_threshold must be decibels such as -35dB"), "{stderr}");
    let output = Command::new("plugins/loudness.sh").arg(&file).args(["-35dB", "0.5"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"silence_threshold\":\"-35dB\""));
}

#[test]
fn config_takes_api_tokens_and_the_jwt_secret_and_prints_neither() {
    const TOKENS: [&str; 3] = ["api-token-full-0101", "api-token-full-0102", "api-token-look-0103"];
    const JWT_SECRET: &str = "jwt-secret-0104-with-enough-characters";
    let (code, stdout, stderr) = run(echo_worker(&["config"])
        .env("ECHO_AUTH__TOKENS", format!("{}, {}", TOKENS[0], TOKENS[1]))
        .env("ECHO_AUTH__READ_ONLY_TOKENS", TOKENS[2])
        .env("SUPABASE_JWT_SECRET", JWT_SECRET)
        .env("RUST_LOG", "trace"));
    assert_eq!(code, 0, "{stderr}");
    for secret in TOKENS.iter().chain([&JWT_SECRET]) {
        assert!(!stdout.contains(secret) && !stderr.contains(secret), "{secret} printed:\n{stdout}\n{stderr}");
    }
    let settings: toml::Table = toml::from_str(&stdout).expect("config prints TOML");
    assert_eq!(settings["auth"]["tokens"].as_array().map(Vec::len), Some(2));
    assert_eq!(settings["auth"]["read_only_tokens"].as_array().map(Vec::len), Some(1));
    assert_eq!(settings["supabase"]["jwt_secret"].as_str(), Some("[redacted]"));
}
