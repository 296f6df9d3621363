//! A batch as the server keeps it, its lifecycle, and the OpenAI `batch` object it shows.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Seconds a batch has to finish, as its `completion_window` says (`24h`, the only one).
pub const COMPLETION_WINDOW_SECS: u64 = 24 * 3600;

/// OpenAI's batch states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    /// Created; its input file is checked before it is queued.
    Validating,
    /// Queued or running.
    InProgress,
    /// Its output is being split into the output and error files.
    Finalizing,
    /// Done; every request has a line in the output or the error file.
    Completed,
    /// The input file did not validate.
    Failed,
    /// Asked to stop; what it finished will be kept.
    Cancelling,
    /// Stopped; the output file holds what it finished.
    Cancelled,
}

impl BatchStatus {
    /// The API's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Validating,
            Self::InProgress,
            Self::Finalizing,
            Self::Completed,
            Self::Failed,
            Self::Cancelling,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|b| b.as_str() == s)
    }

    /// Whether the batch has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The column that records when the batch entered this state.
    pub(crate) fn stamp_column(self) -> &'static str {
        match self {
            Self::Validating => "created_at",
            Self::InProgress => "in_progress_at",
            Self::Finalizing => "finalizing_at",
            Self::Completed => "completed_at",
            Self::Failed => "failed_at",
            Self::Cancelling => "cancelling_at",
            Self::Cancelled => "cancelled_at",
        }
    }
}

/// `request_counts`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests in the input.
    pub total: u64,
    /// Requests with a line in the output file.
    pub completed: u64,
    /// Requests with a line in the error file.
    pub failed: u64,
}

/// One entry of `errors.data`: why the input file did not validate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchError {
    /// Machine-readable code.
    pub code: String,
    /// What is wrong, and how to fix it.
    pub message: String,
    /// The field at fault, when one is.
    pub param: Option<String>,
    /// The input line (1-based), when one is at fault.
    pub line: Option<u64>,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    /// Creation order.
    pub seq: i64,
    /// `batch_...`.
    pub id: String,
    /// The endpoint every line must name.
    pub endpoint: String,
    /// The input file.
    pub input_file_id: String,
    /// `24h`.
    pub completion_window: String,
    /// Where it stands.
    pub status: BatchStatus,
    /// The caller's key-value pairs.
    pub metadata: Option<Value>,
    /// Validation errors.
    pub errors: Vec<BatchError>,
    /// Successful lines.
    pub output_file_id: Option<String>,
    /// Failed lines.
    pub error_file_id: Option<String>,
    /// Seconds since the epoch, for each state it entered.
    pub created_at: u64,
    /// When the completion window ends.
    pub expires_at: u64,
    /// See [`BatchRecord::created_at`].
    pub in_progress_at: Option<u64>,
    /// See [`BatchRecord::created_at`].
    pub finalizing_at: Option<u64>,
    /// See [`BatchRecord::created_at`].
    pub completed_at: Option<u64>,
    /// See [`BatchRecord::created_at`].
    pub failed_at: Option<u64>,
    /// See [`BatchRecord::created_at`].
    pub cancelling_at: Option<u64>,
    /// See [`BatchRecord::created_at`].
    pub cancelled_at: Option<u64>,
    /// `request_counts`, live while it runs.
    pub counts: Counts,
    /// Completion tokens written so far, as the engine measured them.
    pub completion_tokens: u64,
    /// Seconds the engine has run this batch, over every start.
    pub run_seconds: f64,
}

impl BatchRecord {
    /// A new batch, `validating`.
    pub fn new(
        id: String,
        endpoint: String,
        input_file_id: String,
        metadata: Option<Value>,
        now: u64,
    ) -> Self {
        Self {
            seq: 0,
            id,
            endpoint,
            input_file_id,
            completion_window: "24h".into(),
            status: BatchStatus::Validating,
            metadata,
            errors: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            created_at: now,
            expires_at: now + COMPLETION_WINDOW_SECS,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            cancelling_at: None,
            cancelled_at: None,
            counts: Counts::default(),
            completion_tokens: 0,
            run_seconds: 0.0,
        }
    }

    /// Completion tokens per second of engine time so far.
    pub fn tokens_per_sec(&self) -> Option<f64> {
        (self.run_seconds > 0.0).then(|| self.completion_tokens as f64 / self.run_seconds)
    }

    /// Seconds left at the rate so far, while it runs.
    pub fn eta_secs(&self) -> Option<f64> {
        let done = self.counts.completed + self.counts.failed;
        let left = self.counts.total.saturating_sub(done);
        (self.status == BatchStatus::InProgress && done > 0 && self.run_seconds > 0.0)
            .then(|| left as f64 * self.run_seconds / done as f64)
    }

    /// OpenAI's `batch` object.
    pub fn object(&self) -> BatchObject<'_> {
        BatchObject {
            id: &self.id,
            object: "batch",
            endpoint: &self.endpoint,
            errors: (!self.errors.is_empty()).then(|| ErrorList {
                object: "list",
                data: &self.errors,
            }),
            input_file_id: &self.input_file_id,
            completion_window: &self.completion_window,
            status: self.status.as_str(),
            output_file_id: self.output_file_id.as_deref(),
            error_file_id: self.error_file_id.as_deref(),
            created_at: self.created_at,
            in_progress_at: self.in_progress_at,
            expires_at: self.expires_at,
            finalizing_at: self.finalizing_at,
            completed_at: self.completed_at,
            failed_at: self.failed_at,
            expired_at: None,
            cancelling_at: self.cancelling_at,
            cancelled_at: self.cancelled_at,
            request_counts: self.counts,
            metadata: self.metadata.as_ref(),
        }
    }
}

/// The `batch` object, as the API returns it.
#[derive(Debug, Serialize)]
pub struct BatchObject<'a> {
    id: &'a str,
    object: &'static str,
    endpoint: &'a str,
    errors: Option<ErrorList<'a>>,
    input_file_id: &'a str,
    completion_window: &'a str,
    status: &'static str,
    output_file_id: Option<&'a str>,
    error_file_id: Option<&'a str>,
    created_at: u64,
    in_progress_at: Option<u64>,
    expires_at: u64,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
    request_counts: Counts,
    metadata: Option<&'a Value>,
}

#[derive(Debug, Serialize)]
struct ErrorList<'a> {
    object: &'static str,
    data: &'a [BatchError],
}
