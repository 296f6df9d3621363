//! Why one input line (or its request) failed: the error a result line carries.

/// Machine-readable error codes written into error lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// The line is not a JSON object.
    InvalidJson,
    /// `custom_id` is absent, empty or not a string.
    MissingCustomId,
    /// An earlier line already used this `custom_id`.
    DuplicateCustomId,
    /// `method` or `url` is not `POST /v1/chat/completions`.
    InvalidUrl,
    /// `stream: true` cannot be served in a batch.
    StreamUnsupported,
    /// `messages` is absent, empty or malformed.
    InvalidMessages,
    /// A message has a role we do not know.
    InvalidRole,
    /// A message's content is not a string.
    InvalidContent,
    /// A sampling field has the wrong type or range.
    InvalidParameter,
    /// The prompt plus `max_tokens` does not fit the context.
    ContextLengthExceeded,
    /// llama.cpp failed while serving this request.
    EngineError,
}

impl ErrorCode {
    /// The code as written into the output's `error.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingCustomId => "missing_custom_id",
            Self::DuplicateCustomId => "duplicate_custom_id",
            Self::InvalidUrl => "invalid_url",
            Self::StreamUnsupported => "stream_unsupported",
            Self::InvalidMessages => "invalid_messages",
            Self::InvalidRole => "invalid_role",
            Self::InvalidContent => "invalid_content",
            Self::InvalidParameter => "invalid_parameter",
            Self::ContextLengthExceeded => "context_length_exceeded",
            Self::EngineError => "engine_error",
        }
    }

    /// Whether the error is of the moment, not of the request: an engine failure (a decode
    /// that failed, a full KV cache) says "run it again", and the same request may well
    /// succeed then. Every other code follows from the request's own content and the run's
    /// settings, so an identical request in the same run gets it too.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::EngineError)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one input line (or its request) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// The line's `custom_id`, where it could be read.
    pub custom_id: Option<String>,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What went wrong and how to fix it.
    pub message: String,
}

impl LineError {
    /// An error for `line`, with the `custom_id` when known.
    pub fn new(line: u64, custom_id: Option<&str>, code: ErrorCode, message: String) -> Self {
        Self {
            line,
            custom_id: custom_id.map(str::to_owned),
            code,
            message,
        }
    }
}
