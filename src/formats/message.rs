//! One chat message, the unit a prompt is rendered from.

/// One chat message, as validated from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant` (`developer` is read as `system`).
    pub role: String,
    /// The message text.
    pub content: String,
}
