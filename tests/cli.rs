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
    let expected: usize = echo_worker::pipeline::toml_files(Path::new("tests/fixtures/pipelines/invalid"))
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
    let (code, stdout, stderr) = run(echo_worker(&["process", file.to_str().unwrap()]).args(LOUDNESS_ONLY));
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
        run(echo_worker(&["process", file.to_str().unwrap(), "--pipeline", "audio-qa"]).env("DATABASE_URL", &database));
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
        .current_dir(cwd.path())
        .env("TEMP_DIR", temp.path()));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("integrated_lufs"), "the unpacked loudness.sh ran: {stdout}");
}
