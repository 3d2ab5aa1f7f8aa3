//! Every broken pipeline and plugin file under `tests/fixtures/*/invalid/` must fail to load with exactly the
//! diagnostics in its `.expected` file (`file:line:column: message`, one per line). Set `UPDATE_EXPECTED=1` to
//! rewrite the expected files after a deliberate change, then review the diff.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use echo_worker::document::Diagnostic;
use echo_worker::document::Document;
use echo_worker::pipeline::compile::compile;
use echo_worker::plugin::{Plugin, PluginSet};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new("tests/fixtures").join(kind).join("invalid");
    echo_worker::document::toml_files(&dir).expect("fixture folder exists")
}

fn shipped_plugins() -> PluginSet {
    let set = PluginSet::load_dir(Path::new("plugins")).expect("plugins folder is readable");
    assert!(set.diagnostics.is_empty(), "shipped plugins are valid: {:?}", set.diagnostics);
    set
}

/// Compares one fixture's diagnostics with its `.expected` file, returning a description of any difference.
fn compare(file: &Path, diagnostics: &[Diagnostic]) -> Option<String> {
    let actual: String = diagnostics.iter().map(|d| format!("{d}\n")).collect();
    let expected_file = file.with_extension("expected");
    if std::env::var_os("UPDATE_EXPECTED").is_some() {
        std::fs::write(&expected_file, &actual).expect("expected file is writable");
        return None;
    }
    let expected = std::fs::read_to_string(&expected_file).unwrap_or_default();
    (expected != actual).then(|| format!("{}:\n--- expected\n{expected}--- actual\n{actual}", file.display()))
}

#[test]
fn every_invalid_pipeline_reports_exactly_its_expected_errors() {
    let plugins = shipped_plugins();
    let files = fixtures("pipelines");
    assert!(files.len() >= 15, "at least 15 broken pipeline fixtures, found {}", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let document = Document::read(file).expect("fixture is readable");
        match compile(&document, &plugins, &[]) {
            Ok(_) => failures.push(format!("{} compiled but should not", file.display())),
            Err(diagnostics) => failures.extend(compare(file, &diagnostics)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_invalid_plugin_reports_exactly_its_expected_errors() {
    let mut failures = Vec::new();
    for file in &fixtures("plugins") {
        let document = Document::read(file).expect("fixture is readable");
        match Plugin::load(&document) {
            Ok(_) => failures.push(format!("{} loaded but should not", file.display())),
            Err(diagnostics) => failures.extend(compare(file, &diagnostics)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn fixtures_cover_every_error_class() {
    let plugins = shipped_plugins();
    let mut codes = BTreeSet::new();
    for file in fixtures("pipelines") {
        let document = Document::read(&file).unwrap();
        codes.extend(compile(&document, &plugins, &[]).unwrap_err().iter().map(|d| d.code));
    }
    for file in fixtures("plugins") {
        let document = Document::read(&file).unwrap();
        codes.extend(Plugin::load(&document).unwrap_err().iter().map(|d| d.code));
    }
    for required in [
        "syntax",
        "unknown_key",
        "unknown_kind",
        "unknown_need",
        "duplicate_need",
        "cycle",
        "template_syntax",
        "template_reference",
        "unknown_param",
        "missing_param",
        "param_type",
        "invalid_duration",
        "invalid_size",
        "name_mismatch",
        "invalid_stage_id",
        "section_mismatch",
        "invalid_value",
        "invalid_schema",
    ] {
        assert!(codes.contains(required), "no fixture produces `{required}`; produced: {codes:?}");
    }
}

#[test]
fn one_file_with_three_mistakes_reports_all_three() {
    let document = Document::read(Path::new("tests/fixtures/pipelines/invalid/several-mistakes.toml")).unwrap();
    let diagnostics = compile(&document, &shipped_plugins(), &[]).unwrap_err();
    let codes: Vec<&str> = diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(codes, ["unknown_kind", "invalid_duration", "template_reference"], "{diagnostics:#?}");
}

#[test]
fn shipped_pipelines_compile_with_defaults_filled_in() {
    let catalog = echo_worker::catalog::Catalog::load(Path::new("pipelines"), Path::new("plugins")).unwrap();
    for name in ["default", "meeting", "podcast", "soundscribe", "transcribe-only", "audio-qa"] {
        assert!(catalog.pipelines.contains_key(name), "pipelines/{name}.toml ships");
    }
    let meeting = &catalog.pipelines["meeting"];
    let order: Vec<&str> = meeting.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(order, ["validate", "download", "transcode", "transcript", "summary", "action_items", "persist"]);
    let transcript = meeting.stage("transcript").unwrap();
    assert_eq!(transcript.weight, 60);
    assert_eq!(transcript.timeout, std::time::Duration::from_secs(3600));
    assert_eq!(transcript.retry.max_attempts, 3);
    let persist = meeting.stage("persist").unwrap();
    assert_eq!(persist.trigger, echo_worker::pipeline::Trigger::NoneFailed);
    assert_eq!(meeting.stage("action_items").unwrap().condition.as_deref(), Some("job.params.action_items != false"));
    for file in echo_worker::document::toml_files(Path::new("pipelines"))
        .unwrap()
        .into_iter()
        .chain(echo_worker::document::toml_files(Path::new("plugins")).unwrap())
    {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("#:schema ../schema/"), "{} starts with its #:schema line", file.display());
    }
}

/// A small deterministic generator, so that failures reproduce without a seed file.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

/// Applies one to three random insertions of TOML and template punctuation, or deletions.
fn mangle(original: &str, random: &mut XorShift) -> String {
    const PIECES: [&str; 17] =
        ["\"", "[", "]", "{", "}", "=", ".", "\n", "#", "'", "{{", "}}", "{%", "é", "\\", ",", "needs = [\"x\"]\n"];
    let mut text = original.to_string();
    for _ in 0..=random.next(3) {
        let mut at = random.next(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        if random.next(2) == 0 {
            text.insert_str(at, PIECES[random.next(PIECES.len())]);
        } else {
            let mut end = (at + random.next(8)).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.replace_range(at..end, "");
        }
    }
    text
}

fn assert_well_formed(diagnostics: &[Diagnostic]) {
    assert!(!diagnostics.is_empty());
    for diagnostic in diagnostics {
        assert!(diagnostic.line >= 1 && diagnostic.column >= 1, "{diagnostic}");
        assert!(!diagnostic.message.is_empty(), "{diagnostic}");
    }
}

/// The loaders face user-edited files: whatever the text, they answer with diagnostics and never panic.
#[test]
fn mangled_files_are_reported_never_panicked_on() {
    const ROUNDS: usize = 300;
    let plugins = shipped_plugins();
    let mut random = XorShift(0x5eed_cafe);
    let mut refused = 0;
    let pipelines = echo_worker::document::toml_files(Path::new("pipelines")).unwrap();
    let plugin_files = echo_worker::document::toml_files(Path::new("plugins")).unwrap();
    for file in &pipelines {
        let original = std::fs::read_to_string(file).unwrap();
        for _ in 0..ROUNDS {
            if let Err(diagnostics) = compile(&Document::new(file, mangle(&original, &mut random)), &plugins, &[]) {
                assert_well_formed(&diagnostics);
                refused += 1;
            }
        }
    }
    for file in &plugin_files {
        let original = std::fs::read_to_string(file).unwrap();
        for _ in 0..ROUNDS {
            if let Err(diagnostics) = Plugin::load(&Document::new(file, mangle(&original, &mut random))) {
                assert_well_formed(&diagnostics);
                refused += 1;
            }
        }
    }
    let total = (pipelines.len() + plugin_files.len()) * ROUNDS;
    assert!(refused > total / 4, "most mangled files are refused ({refused} of {total})");
}

fn compile_errors(body: &str) -> Vec<String> {
    let document = Document::new("test.toml", format!("name = \"test\"\n{body}"));
    compile(&document, &shipped_plugins(), &[]).err().unwrap_or_default().iter().map(ToString::to_string).collect()
}

#[test]
fn silence_threshold_is_checked_at_pipeline_load() {
    let stage = "[stages.transcode]\nuses = \"transcode\"\nwith = { input = \"x.mp3\", split_at_silence = true, ";
    for good in ["-35dB", "0.03"] {
        assert_eq!(compile_errors(&format!("{stage}silence_threshold = \"{good}\" }}\n")), Vec::<String>::new());
    }
    // Pasted into `silencedetect=noise=…:d=…`, this would add a filter that reads any file.
    let errors = compile_errors(&format!("{stage}silence_threshold = \"-30dB,amovie=/etc/passwd\" }}\n"));
    assert_eq!(
        errors,
        ["test.toml:4:72: `stages.transcode.with.silence_threshold`: invalid silence threshold \
             `-30dB,amovie=/etc/passwd`: expected decibels from -200dB to 0dB such as \"-30dB\", or an amplitude \
             ratio from 0 to 1 such as \"0.03\""]
    );
    assert_eq!(compile_errors(&format!("{stage}silence_threshold = \"-30\" }}\n")).len(), 1, "dB needs its unit");
}

#[test]
fn max_attempts_of_4294967295_is_refused_at_load() {
    let errors = compile_errors(
        "[stages.validate]\nuses = \"validate\"\nretry = { max_attempts = 4294967295, initial_interval = \"0s\" }\n",
    );
    assert_eq!(
        errors,
        ["test.toml:4:26: `stages.validate.retry.max_attempts` is 4294967295; at most 100 attempts are allowed"]
    );
    assert!(compile_errors("[stages.validate]\nuses = \"validate\"\nretry = { max_attempts = 100 }\n").is_empty());
    let plugin = Document::new(
        "plugins/spin.toml",
        "name = \"spin\"\nkind = \"command\"\n[command]\nprogram = \"true\"\n[retry]\nmax_attempts = 4294967295\n",
    );
    let errors: Vec<String> = Plugin::load(&plugin).unwrap_err().iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["plugins/spin.toml:6:16: `retry.max_attempts` is 4294967295; at most 100 attempts are allowed"]
    );
}

#[test]
fn a_non_utf8_toml_is_one_error_and_every_other_file_is_still_checked() {
    let pipelines = tempfile::tempdir().unwrap();
    let plugins = tempfile::tempdir().unwrap();
    std::fs::write(pipelines.path().join("latin1.toml"), b"name = \"latin1\"\n# caf\xe9\n").unwrap();
    std::fs::write(
        pipelines.path().join("typo.toml"),
        "name = \"typo\"\n[stages.a]\nuses = \"validate\"\ntimout = \"1s\"\n",
    )
    .unwrap();
    std::fs::write(plugins.path().join("binary.toml"), b"\x00\xff\xfe").unwrap();
    let error = echo_worker::catalog::Catalog::load(pipelines.path(), plugins.path()).unwrap_err();
    let echo_worker::document::LoadError::Invalid(diagnostics) = error else { panic!("not a list: {error}") };
    let found: Vec<(String, &str)> = diagnostics
        .iter()
        .map(|d| (format!("{}:{}:{}", d.file.file_name().unwrap().to_string_lossy(), d.line, d.column), d.code))
        .collect();
    assert_eq!(
        found,
        [
            ("binary.toml:1:2".to_string(), "not_utf8"),
            ("latin1.toml:2:6".into(), "not_utf8"),
            ("typo.toml:4:1".into(), "unknown_key")
        ],
        "{diagnostics:#?}"
    );
    assert!(diagnostics[1].message.contains("not UTF-8 text (byte 0xe9"), "{}", diagnostics[1].message);
}

#[test]
fn two_hundred_thousand_unknown_keys_do_not_reparse_once_per_key() {
    // Before, each unknown key cost one more deserialization of the whole file: 8,000 keys took 7 s and
    // 200,000 took minutes. Now all unknown keys of a table go in one round; this test only has to finish.
    let keys: String = (0..200_000).map(|index| format!("unknown_{index} = {index}\n")).collect();
    let errors = compile_errors(&format!("[stages.a]\nuses = \"validate\"\n{keys}"));
    assert_eq!(errors.len(), 101, "100 listed and one line counting the rest");
    assert!(
        errors[0].starts_with("test.toml:4:1: unknown key `stages.a.unknown_0`; expected one of: uses,"),
        "{}",
        errors[0]
    );
    assert!(errors[99].starts_with("test.toml:103:1: unknown key `stages.a.unknown_99`"), "{}", errors[99]);
    assert_eq!(errors[100], "test.toml:104:1: 199900 more problems are not listed; the first 100 are above");
}
