//! Stage kinds: what a pipeline's `uses` can name.
//!
//! A kind is either one of the builtins below (each declares its `with` parameters as a Rust struct, so that
//! pipelines are checked against it and the JSON Schema offers completion for it) or a plugin from `plugins/`.
//! The behaviour of each kind arrives with the engine; this module is the one list of what exists.

pub mod builtin;

use std::fmt;

pub use builtin::BuiltinKind;

/// What a stage's `uses` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageKind {
    /// A kind implemented in this crate.
    Builtin(BuiltinKind),
    /// A plugin declared in `plugins/NAME.toml`.
    Plugin(String),
}

impl StageKind {
    /// The name written in `uses`.
    pub fn name(&self) -> &str {
        match self {
            Self::Builtin(kind) => kind.name(),
            Self::Plugin(name) => name,
        }
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
