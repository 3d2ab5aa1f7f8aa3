//! The deploy recipes stay in line with the code: the Procfile's commands exist, the Dockerfile builds what
//! `.ci/run` builds and checks `/health` as a non-root user with ffmpeg installed, and `render.yaml` carries every
//! environment name of the old Node worker's service (old-worker.md §6) plus what this service needs. No Docker
//! daemon runs here, so the image is not built; `.ci/run` runs the same build and health check instead.

use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn echo_worker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_echo-worker")).args(args).output().unwrap()
}

#[test]
fn the_procfile_runs_commands_the_binary_has() {
    let procfile = read("Procfile");
    let lines: Vec<&str> = procfile.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines, ["web: echo-worker serve", "worker: echo-worker worker"]);
    for line in lines {
        let command = line.split_once(": echo-worker ").unwrap().1;
        let output = echo_worker(&[command, "--help"]);
        assert!(output.status.success(), "`echo-worker {command}` exists: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[test]
fn the_dockerfile_builds_what_ci_builds_and_checks_health_as_a_non_root_user() {
    let dockerfile = read("Dockerfile");
    let ci = read(".ci/run");
    assert_eq!(dockerfile.matches("\nFROM ").count(), 2, "multi-stage: a build stage and a runtime stage");
    for both in ["cargo build --release --locked", "ffmpeg", "ca-certificates", "curl"] {
        assert!(dockerfile.contains(both), "the Dockerfile has {both}");
        assert!(ci.contains(both), ".ci/run exercises {both}");
    }
    let user = dockerfile.lines().find_map(|line| line.strip_prefix("USER ")).expect("a USER line").trim();
    assert!(!["root", "0"].contains(&user), "runs as a non-root user, not {user}");
    let healthcheck = dockerfile.split("HEALTHCHECK").nth(1).expect("a HEALTHCHECK");
    assert!(healthcheck.lines().take(3).any(|line| line.contains("/health")), "the HEALTHCHECK asks /health");
    assert!(dockerfile.contains(r#"CMD ["echo-worker", "serve"]"#));
    assert!(ci.contains("/health"), ".ci/run asks the release binary's /health");
}

/// Every variable the old service's `render.yaml` and `.env.render` set (old-worker.md §6).
const OLD_SERVICE: [&str; 21] = [
    "PORT",
    "NODE_ENV",
    "LOG_LEVEL",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "SUPABASE_ANON_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_API_VERSION",
    "AZURE_OPENAI_GPT4O_MINI_DEPLOYMENT",
    "AZURE_OPENAI_WHISPER_DEPLOYMENT",
    "AZURE_OPENAI_WHISPER_ENDPOINT",
    "AZURE_OPENAI_WHISPER_API_KEY",
    "WORKER_CONCURRENCY",
    "REDIS_URL",
    "MAX_FILE_SIZE_MB",
    "CHUNK_SIZE_MB",
    "PROCESSING_TIMEOUT_MS",
    "HEALTH_CHECK_INTERVAL",
    "ALLOWED_ORIGINS",
    "TEMP_DIR",
];

#[test]
fn render_yaml_replaces_the_old_service_with_the_same_variable_names() {
    let render = read("render.yaml");
    let keys: Vec<&str> =
        render.lines().filter_map(|line| line.trim().strip_prefix("- key: ")).map(str::trim).collect();
    for name in OLD_SERVICE {
        assert!(keys.contains(&name), "render.yaml sets {name}");
    }
    for name in ["DATABASE_URL", "ECHO_DATABASE__PROFILE"] {
        assert!(keys.contains(&name), "render.yaml sets {name}, which the store needs");
    }
    assert!(render.contains("name: eci-soundscribe"), "the old service's name");
    assert!(render.contains("healthCheckPath: /health"));
    assert!(render.contains("dockerfilePath: ./Dockerfile"));
    // Secrets are set in the dashboard, never written here.
    for secret in [
        "SUPABASE_SERVICE_ROLE_KEY",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_WHISPER_API_KEY",
        "DATABASE_URL",
        "REDIS_URL",
    ] {
        let entry = render.split(&format!("- key: {secret}\n")).nth(1).unwrap();
        assert!(entry.trim_start().starts_with("sync: false"), "{secret} is not written in render.yaml");
    }
    // The values the binary reads must parse: the same names through the binary's own settings.
    let cwd = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_echo-worker"));
    command.arg("config").current_dir(cwd.path());
    let mut pending: Option<&str> = None;
    for line in render.lines().map(str::trim) {
        if let Some(key) = line.strip_prefix("- key: ") {
            pending = Some(key);
        } else if let (Some(key), Some(value)) = (pending, line.strip_prefix("value: ")) {
            command.env(key, value.trim_matches('"'));
            pending = None;
        }
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "render.yaml's values load: {}", String::from_utf8_lossy(&output.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    assert_eq!(printed["database"]["profile"].as_str(), Some("supabase-legacy"));
    assert_eq!(printed["server"]["port"].as_integer(), Some(10000));
    assert_eq!(printed["limits"]["max_file_size_mb"].as_integer(), Some(500));
}
