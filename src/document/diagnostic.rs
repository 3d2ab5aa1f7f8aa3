//! Diagnostics for pipeline and plugin files: every problem carries its file, line, column and a stable code,
//! so that `echo-worker validate` can list all of them at once for people (`file:line:col: message`) and tools
//! (`--format json`).

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::terminal::escape;

/// One problem found while loading a pipeline or plugin file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// A stable machine-readable class, such as `unknown_key` or `cycle`.
    pub code: &'static str,
    /// A sentence for a person; it names the offending key, stage or value.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys, ids and file names come from the files; a control character in them must not reach a terminal.
        let file = self.file.display().to_string();
        write!(f, "{}:{}:{}: {}", escape(&file), self.line, self.column, escape(&self.message))
    }
}

/// Why a folder of pipelines or plugins could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A folder or file could not be read at all. The I/O error is the `source`, not part of this message, so a
    /// printed chain names it once.
    #[error("cannot read {}", path.display())]
    Read {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The files were read but are invalid; every problem is listed.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let mut text = format!(
        "{} problem{} in pipeline and plugin files:",
        diagnostics.len(),
        if diagnostics.len() == 1 { "" } else { "s" }
    );
    for diagnostic in diagnostics {
        text.push_str("\n  ");
        text.push_str(&diagnostic.to_string());
    }
    text
}
