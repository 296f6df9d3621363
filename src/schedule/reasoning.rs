//! A reasoning model's thinking, followed token by token: where the thinking starts and ends in
//! the generated text, how many tokens it took, and the marker tokens the engine writes itself
//! to open it (when the prompt did not) or to close it (when its budget is spent).
//!
//! Markers are found in the text, not by token id, so a marker split across several tokens, or
//! written by the engine, is found the same way as one sampled whole.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::engine::Token;

/// How one request thinks: its markers, who opens the block, and its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkPlan {
    /// The open marker, such as `<think>`.
    pub open: String,
    /// The close marker, such as `</think>`.
    pub close: String,
    /// The open marker as tokens: written first when the prompt did not open the block.
    pub open_tokens: Vec<Token>,
    /// The close marker as tokens: written when the budget is spent.
    pub close_tokens: Vec<Token>,
    /// Whether the prompt itself ends inside an open block (as DeepSeek-R1's template does).
    pub opened_by_prompt: bool,
    /// Thinking tokens allowed before the engine closes the block; 0 closes it at once.
    pub budget: u32,
}

/// Where the generation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The engine is writing the open marker.
    Opening,
    /// Thinking; its text starts at this byte.
    Thinking { start: usize },
    /// The answer; the thinking was `reasoning`, the answer starts at byte `start`.
    Answer {
        reasoning: (usize, usize),
        start: usize,
    },
}

/// What a token did to the thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed phase.
    Same,
    /// This token completed the close marker: the answer starts with the next token.
    Closed,
}

/// One choice's thinking.
#[derive(Debug, Clone)]
pub struct Thinking {
    plan: Arc<ThinkPlan>,
    phase: Phase,
    /// Tokens taken so far, the thinking's and the answer's.
    taken: u32,
    /// Tokens from the first one of the thinking (open marker included) to the close marker.
    reasoning_tokens: u32,
    /// Of those, the ones after the open marker: what the budget counts.
    thought: u32,
    /// Tokens taken before the answer's first.
    answer_from: Option<u32>,
    forced: VecDeque<Token>,
    budget_spent: bool,
    /// Bytes of the text already searched for the close marker.
    searched: usize,
}

impl Thinking {
    /// The thinking of a choice about to generate under `plan`.
    pub fn new(plan: Arc<ThinkPlan>) -> Self {
        let mut t = Self {
            phase: Phase::Opening,
            taken: 0,
            reasoning_tokens: 0,
            thought: 0,
            answer_from: None,
            forced: VecDeque::new(),
            budget_spent: false,
            searched: 0,
            plan,
        };
        if t.plan.opened_by_prompt {
            t.phase = Phase::Thinking { start: 0 };
            t.close_if_over_budget();
        } else {
            t.forced.extend(t.plan.open_tokens.iter().copied());
        }
        t
    }

    /// The token the engine writes next instead of sampling one, if any.
    pub fn forced(&mut self) -> Option<Token> {
        self.forced.pop_front()
    }

    /// Whether the answer has started (the constraint, stop strings and log probabilities
    /// apply from here on).
    pub fn answering(&self) -> bool {
        matches!(self.phase, Phase::Answer { .. })
    }

    /// Whether the engine closed the block because the budget was spent.
    pub fn budget_spent(&self) -> bool {
        self.budget_spent
    }

    /// Notes one more taken token, whose bytes have joined `text` (the whole generated text).
    pub fn advance(&mut self, text: &str) -> Step {
        self.taken += 1;
        match self.phase {
            Phase::Opening => {
                self.reasoning_tokens += 1;
                if let Some(at) = text.find(&self.plan.open) {
                    let start = at + self.plan.open.len();
                    self.phase = Phase::Thinking { start };
                    self.searched = start;
                    self.close_if_over_budget();
                }
                Step::Same
            }
            Phase::Thinking { start } => {
                self.reasoning_tokens += 1;
                self.thought += 1;
                let close = &self.plan.close;
                let mut from = self.searched.saturating_sub(close.len()).max(start);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                self.searched = text.len();
                if let Some(at) = text[from..].find(close.as_str()) {
                    let end = from + at;
                    self.phase = Phase::Answer {
                        reasoning: (start, end),
                        start: end + close.len(),
                    };
                    self.answer_from = Some(self.taken);
                    self.forced.clear();
                    return Step::Closed;
                }
                self.close_if_over_budget();
                Step::Same
            }
            Phase::Answer { .. } => Step::Same,
        }
    }

    fn close_if_over_budget(&mut self) {
        if !self.budget_spent && self.thought >= self.plan.budget {
            self.budget_spent = true;
            self.forced.extend(self.plan.close_tokens.iter().copied());
        }
    }

    /// Tokens of the thinking, markers included; all of them when it never closed.
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// How many of the taken tokens came before the answer (all of them while thinking).
    pub fn tokens_before_answer(&self) -> u32 {
        self.answer_from.unwrap_or(self.taken)
    }

    /// The byte where stop strings may start matching: the answer's first character that is
    /// not whitespace (the whitespace after the close marker is not the answer's), or the end
    /// of the text while there is none.
    pub fn answer_start(&self, text: &str) -> usize {
        match self.phase {
            Phase::Answer { start, .. } => {
                let rest = text.get(start..).unwrap_or("");
                let answer = rest.trim_start();
                if answer.is_empty() {
                    text.len()
                } else {
                    start + (rest.len() - answer.len())
                }
            }
            _ => text.len(),
        }
    }

    /// Ends the thinking now: the engine writes the close marker next (a model that ended its
    /// generation while thinking still owes an answer).
    pub fn force_close(&mut self) {
        if !self.answering() && self.forced.is_empty() {
            self.budget_spent = true;
            self.forced.extend(self.plan.close_tokens.iter().copied());
        }
    }

    /// Splits the final `text` into the thinking and the answer. A choice that ended while
    /// thinking has an empty answer.
    pub fn split(&self, text: &str) -> (String, String) {
        let piece = |a: usize, b: usize| text.get(a..b.min(text.len())).unwrap_or("");
        match self.phase {
            // The open marker never appeared: what there is, is no thinking.
            Phase::Opening => (String::new(), text.trim_start().to_owned()),
            Phase::Thinking { start } => {
                (piece(start, text.len()).trim().to_owned(), String::new())
            }
            Phase::Answer { reasoning, start } => (
                piece(reasoning.0, reasoning.1).trim().to_owned(),
                piece(start, text.len()).trim_start().to_owned(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Markers of three tokens each ("<", "think", ">"), as a vocabulary without them whole
    /// would split them.
    fn plan(opened: bool, budget: u32) -> Arc<ThinkPlan> {
        Arc::new(ThinkPlan {
            open: "<think>".into(),
            close: "</think>".into(),
            open_tokens: vec![Token(1), Token(2), Token(3)],
            close_tokens: vec![Token(4), Token(2), Token(3)],
            opened_by_prompt: opened,
            budget,
        })
    }

    /// Feeds `pieces` as taken tokens; returns the steps.
    fn feed(t: &mut Thinking, text: &mut String, pieces: &[&str]) -> Vec<Step> {
        pieces
            .iter()
            .map(|p| {
                text.push_str(p);
                t.advance(text)
            })
            .collect()
    }

    #[test]
    fn a_close_marker_arriving_whole_ends_the_thinking() {
        let mut t = Thinking::new(plan(true, 100));
        assert_eq!(t.forced(), None, "the prompt opened it");
        let mut text = String::new();
        let steps = feed(
            &mut t,
            &mut text,
            &["Let me ", "see.", "</think>", "\n\n", "{\"a\":1}"],
        );
        assert_eq!(steps[2], Step::Closed);
        assert!(t.answering());
        assert_eq!(t.split(&text), ("Let me see.".into(), "{\"a\":1}".into()));
        assert_eq!((t.reasoning_tokens(), t.tokens_before_answer()), (3, 3));
        assert!(!t.budget_spent());
    }

    #[test]
    fn a_close_marker_split_across_tokens_is_found() {
        let mut t = Thinking::new(plan(true, 100));
        let mut text = String::new();
        let steps = feed(&mut t, &mut text, &["hm", "</", "thi", "nk", ">", "yes"]);
        assert_eq!(
            steps,
            [
                Step::Same,
                Step::Same,
                Step::Same,
                Step::Same,
                Step::Closed,
                Step::Same
            ]
        );
        assert_eq!(t.split(&text), ("hm".into(), "yes".into()));
        assert_eq!(t.reasoning_tokens(), 5);
    }

    #[test]
    fn the_budget_forces_the_close_and_the_answer_follows() {
        let mut t = Thinking::new(plan(true, 2));
        let mut text = String::new();
        feed(&mut t, &mut text, &["a", "b"]);
        assert!(t.budget_spent());
        // The engine writes the close marker's tokens; their text joins the thinking's.
        let forced: Vec<_> = std::iter::from_fn(|| t.forced()).collect();
        assert_eq!(forced, [Token(4), Token(2), Token(3)]);
        let steps = feed(&mut t, &mut text, &["</", "think", ">", "ok"]);
        assert_eq!(steps[2], Step::Closed);
        assert_eq!(t.split(&text), ("ab".into(), "ok".into()));
        assert_eq!(t.reasoning_tokens(), 5);
    }

    #[test]
    fn a_zero_budget_closes_at_once_and_an_unopened_block_is_opened_first() {
        let mut t = Thinking::new(plan(true, 0));
        assert_eq!(
            std::iter::from_fn(|| t.forced()).count(),
            3,
            "closed before any token"
        );

        let mut t = Thinking::new(plan(false, 1));
        let opening: Vec<_> = std::iter::from_fn(|| t.forced()).collect();
        assert_eq!(opening, [Token(1), Token(2), Token(3)]);
        let mut text = String::new();
        feed(&mut t, &mut text, &["<", "think", ">"]);
        assert!(!t.budget_spent(), "the open marker is not thinking");
        feed(&mut t, &mut text, &["x"]);
        assert!(t.budget_spent());
        feed(&mut t, &mut text, &["</think>", "A"]);
        assert_eq!(t.split(&text), ("x".into(), "A".into()));
        assert_eq!((t.reasoning_tokens(), t.tokens_before_answer()), (5, 5));
    }

    #[test]
    fn a_choice_that_ends_while_thinking_has_no_answer() {
        let mut t = Thinking::new(plan(true, 100));
        let mut text = String::new();
        feed(&mut t, &mut text, &["still ", "going"]);
        assert!(!t.answering());
        assert_eq!(t.split(&text), ("still going".into(), String::new()));
        assert_eq!(t.answer_start(&text), text.len());
    }

    #[test]
    fn stop_strings_start_after_the_whitespace_that_follows_the_close() {
        let mut t = Thinking::new(plan(true, 100));
        let mut text = String::new();
        feed(&mut t, &mut text, &["x", "</think>", "\n\n"]);
        assert_eq!(t.answer_start(&text), text.len(), "no answer yet");
        feed(&mut t, &mut text, &["Yes"]);
        assert_eq!(&text[t.answer_start(&text)..], "Yes");
    }
}
