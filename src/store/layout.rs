//! How the store's logical fields lie in a real table (ARCHITECTURE.md): which column holds each field, which
//! status words the table allows, and whether the store may create the table and its rows.
//!
//! Two profiles: `echo` (the store's own table, created at start, every field in a column of the same name)
//! and `supabase-legacy` (the live frontend's `recordings` table, which belongs to the customer: never created
//! or altered, rows never inserted, the status only `processing | completed | failed`, the progress in
//! `processing_progress`, the error in `error_message`, the owner in `user_id`, the completion time in
//! `processed_at`). Any field's column can be overridden, or set to `""` to leave the field out.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use super::RecordingStatus;

/// A logical field of a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// The row id.
    Id,
    /// Where the media is.
    FileUrl,
    /// The file's name.
    FileName,
    /// The sniffed MIME type.
    MimeType,
    /// The file size in bytes.
    SizeBytes,
    /// The duration in seconds.
    DurationS,
    /// The status word.
    Status,
    /// 0 to 100.
    Progress,
    /// The stage running now.
    Stage,
    /// A message for people.
    Message,
    /// The job working on it.
    JobId,
    /// The pipeline.
    Pipeline,
    /// The transcript text.
    Transcript,
    /// The results as JSON.
    Result,
    /// Why it failed.
    Error,
    /// The user it belongs to.
    OwnerId,
    /// When the row was created.
    CreatedAt,
    /// When the row last changed.
    UpdatedAt,
    /// When it completed.
    CompletedAt,
}

impl Field {
    /// Every field, in the order of the store's own table.
    pub const ALL: [Self; 19] = [
        Self::Id,
        Self::FileUrl,
        Self::FileName,
        Self::MimeType,
        Self::SizeBytes,
        Self::DurationS,
        Self::Status,
        Self::Progress,
        Self::Stage,
        Self::Message,
        Self::JobId,
        Self::Pipeline,
        Self::Transcript,
        Self::Result,
        Self::Error,
        Self::OwnerId,
        Self::CreatedAt,
        Self::UpdatedAt,
        Self::CompletedAt,
    ];

    /// The field's name (also its column in the `echo` profile).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Id => "id",
            Self::FileUrl => "file_url",
            Self::FileName => "file_name",
            Self::MimeType => "mime_type",
            Self::SizeBytes => "size_bytes",
            Self::DurationS => "duration_s",
            Self::Status => "status",
            Self::Progress => "progress",
            Self::Stage => "stage",
            Self::Message => "message",
            Self::JobId => "job_id",
            Self::Pipeline => "pipeline",
            Self::Transcript => "transcript",
            Self::Result => "result",
            Self::Error => "error",
            Self::OwnerId => "owner_id",
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::CompletedAt => "completed_at",
        }
    }

    /// The field called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.name() == name)
    }

    /// Fields a pipeline's `persist` may not write as named columns: the store keeps them itself.
    pub const fn is_bookkeeping(self) -> bool {
        !matches!(self, Self::FileUrl | Self::FileName | Self::MimeType | Self::SizeBytes | Self::DurationS)
    }
}

/// Which layout the table has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// The store's own table, created at start.
    #[default]
    Echo,
    /// The live SoundScribe frontend's Supabase `recordings` table (old-worker.md §4).
    SupabaseLegacy,
}

impl Profile {
    /// The name used in settings.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::SupabaseLegacy => "supabase-legacy",
        }
    }
}

/// Why a layout is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `database.columns` names a field the store does not have.
    #[error("database.columns: unknown field `{field}` (the fields are: {known})")]
    UnknownField {
        /// The name given.
        field: String,
        /// The known names.
        known: String,
    },
    /// A column name is not a plain identifier.
    #[error("database.columns.{field}: `{column}` is not a usable column name (letters, digits and _)")]
    BadColumn {
        /// The field.
        field: String,
        /// The column given.
        column: String,
    },
    /// A field the store cannot work without was left out.
    #[error("database.columns.{0}: this field cannot be left out")]
    Required(&'static str),
}

/// The logical fields mapped to a table's columns, and the table's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    profile: Profile,
    columns: IndexMap<Field, Option<String>>,
}

impl Default for Layout {
    fn default() -> Self {
        Self::profile(Profile::Echo)
    }
}

/// Whether `name` is a plain SQL identifier (so it can go into a statement unquoted).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

impl Layout {
    /// A profile's layout with no overrides.
    pub fn profile(profile: Profile) -> Self {
        let columns = Field::ALL
            .into_iter()
            .map(|field| {
                let column = match profile {
                    Profile::Echo => Some(field.name()),
                    Profile::SupabaseLegacy => match field {
                        Field::Id => Some("id"),
                        Field::FileUrl => Some("file_url"),
                        Field::SizeBytes => Some("file_size"),
                        Field::DurationS => Some("duration"),
                        Field::Status => Some("status"),
                        Field::Progress => Some("processing_progress"),
                        Field::Transcript => Some("transcript"),
                        Field::Error => Some("error_message"),
                        Field::OwnerId => Some("user_id"),
                        Field::CreatedAt => Some("created_at"),
                        Field::UpdatedAt => Some("updated_at"),
                        Field::CompletedAt => Some("processed_at"),
                        // No such columns: the frontend reads none of these, and the table is not ours to alter.
                        Field::FileName
                        | Field::MimeType
                        | Field::Stage
                        | Field::Message
                        | Field::JobId
                        | Field::Pipeline
                        | Field::Result => None,
                    },
                };
                (field, column.map(str::to_string))
            })
            .collect();
        Self { profile, columns }
    }

    /// A profile's layout with `overrides` (field name → column, `""` to leave the field out).
    ///
    /// # Errors
    /// [`LayoutError`] naming an unknown field, a bad column name, or `id` / `status` left out.
    pub fn with_overrides(profile: Profile, overrides: &IndexMap<String, String>) -> Result<Self, LayoutError> {
        let mut layout = Self::profile(profile);
        for (name, column) in overrides {
            let field = Field::from_name(name).ok_or_else(|| LayoutError::UnknownField {
                field: name.clone(),
                known: Field::ALL.map(Field::name).join(", "),
            })?;
            let column = column.trim();
            if !column.is_empty() && !is_identifier(column) {
                return Err(LayoutError::BadColumn { field: name.clone(), column: column.to_string() });
            }
            layout.columns.insert(field, (!column.is_empty()).then(|| column.to_string()));
        }
        for field in [Field::Id, Field::Status] {
            if layout.column(field).is_none() {
                return Err(LayoutError::Required(field.name()));
            }
        }
        Ok(layout)
    }

    /// The profile.
    pub const fn profile_kind(&self) -> Profile {
        self.profile
    }

    /// The column holding `field`, if the table has one.
    pub fn column(&self, field: Field) -> Option<&str> {
        self.columns.get(&field).and_then(Option::as_deref)
    }

    /// Every mapped field and its column.
    pub fn mapped(&self) -> impl Iterator<Item = (Field, &str)> {
        self.columns.iter().filter_map(|(field, column)| column.as_deref().map(|column| (*field, column)))
    }

    /// The field stored in `column`, if any.
    pub fn field_of(&self, column: &str) -> Option<Field> {
        self.mapped().find(|(_, mapped)| mapped.eq_ignore_ascii_case(column)).map(|(field, _)| field)
    }

    /// Whether the store creates the table (and its rows) itself.
    pub const fn owns_table(&self) -> bool {
        matches!(self.profile, Profile::Echo)
    }

    /// The word stored for `status`.
    pub const fn stored(&self, status: RecordingStatus) -> &'static str {
        match self.profile {
            Profile::Echo => status.as_str(),
            // The table's CHECK allows uploading, processing, completed and failed; a waiting job is already
            // "processing" for the frontend, and a cancelled one "failed" with the reason in the error.
            Profile::SupabaseLegacy => match status {
                RecordingStatus::Pending | RecordingStatus::Queued | RecordingStatus::Processing => "processing",
                RecordingStatus::Completed => "completed",
                RecordingStatus::Failed | RecordingStatus::Cancelled => "failed",
            },
        }
    }

    /// The error stored with `status` when the caller gives none (the legacy table has no other place to say
    /// that a job was cancelled).
    pub const fn implied_error(&self, status: RecordingStatus) -> Option<&'static str> {
        match (self.profile, status) {
            (Profile::SupabaseLegacy, RecordingStatus::Cancelled) => Some(CANCELLED),
            _ => None,
        }
    }

    /// Reads a stored status word (and the error, which tells a cancelled legacy row from a failed one).
    pub fn decode(&self, stored: &str, error: Option<&str>) -> RecordingStatus {
        match self.profile {
            Profile::Echo => RecordingStatus::parse(stored).unwrap_or(RecordingStatus::Pending),
            Profile::SupabaseLegacy => match stored {
                "processing" => RecordingStatus::Processing,
                "completed" => RecordingStatus::Completed,
                "failed" if error == Some(CANCELLED) => RecordingStatus::Cancelled,
                "failed" => RecordingStatus::Failed,
                _ => RecordingStatus::Pending,
            },
        }
    }

    /// The stored words a row may hold for a move to `status` to be allowed.
    pub fn allowed_from(&self, status: RecordingStatus) -> Vec<&'static str> {
        match self.profile {
            Profile::Echo => status.allowed_from().to_vec(),
            // `uploading` is the frontend's word before a worker is asked. Nothing moves a completed row back to
            // processing: a re-run of a completed recording keeps it completed until new results replace the
            // old ones.
            Profile::SupabaseLegacy => match status {
                RecordingStatus::Pending | RecordingStatus::Queued | RecordingStatus::Processing => {
                    vec!["uploading", "processing", "failed"]
                }
                RecordingStatus::Completed => vec!["uploading", "processing", "completed"],
                RecordingStatus::Failed | RecordingStatus::Cancelled => vec!["uploading", "processing"],
            },
        }
    }
}

/// The error message of a cancelled recording in the legacy table.
pub const CANCELLED: &str = "cancelled";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_legacy_profile_stores_only_the_words_its_check_allows() {
        let layout = Layout::profile(Profile::SupabaseLegacy);
        let all = [
            RecordingStatus::Pending,
            RecordingStatus::Queued,
            RecordingStatus::Processing,
            RecordingStatus::Completed,
            RecordingStatus::Failed,
            RecordingStatus::Cancelled,
        ];
        for status in all {
            assert!(["processing", "completed", "failed"].contains(&layout.stored(status)), "{status:?}");
            assert!(!layout.allowed_from(status).is_empty());
        }
        for status in [RecordingStatus::Queued, RecordingStatus::Processing] {
            assert!(!layout.allowed_from(status).contains(&"completed"), "never back from completed");
        }
        assert_eq!(layout.decode("failed", Some(CANCELLED)), RecordingStatus::Cancelled);
        assert_eq!(layout.decode("failed", Some("boom")), RecordingStatus::Failed);
        assert_eq!(layout.decode("uploading", None), RecordingStatus::Pending);
        assert_eq!(layout.column(Field::Progress), Some("processing_progress"));
        assert_eq!(layout.column(Field::Result), None);
        assert!(!layout.owns_table());
    }

    #[test]
    fn overrides_are_checked() {
        let over = |pairs: &[(&str, &str)]| {
            let map = pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
            Layout::with_overrides(Profile::Echo, &map)
        };
        let layout = over(&[("progress", "pct"), ("stage", "")]).unwrap();
        assert_eq!(layout.column(Field::Progress), Some("pct"));
        assert_eq!(layout.column(Field::Stage), None);
        assert!(matches!(over(&[("progres", "x")]), Err(LayoutError::UnknownField { .. })));
        assert!(matches!(over(&[("progress", "x;drop")]), Err(LayoutError::BadColumn { .. })));
        assert_eq!(over(&[("status", "")]), Err(LayoutError::Required("status")));
    }
}
