//! Incremental, UTF-8-safe detokenization with stop strings.
//!
//! Token pieces are raw bytes, and one character can span several tokens. Bytes are held back
//! until they form whole characters, so no half character is ever emitted or matched.

/// The text a request has generated so far.
#[derive(Debug, Default)]
pub struct TextBuilder {
    text: String,
    pending: Vec<u8>,
}

impl TextBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one token's bytes; complete characters move into the text.
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: `valid` bytes were just checked to be UTF-8.
                    self.text
                        .push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // A truncated character: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return;
                        }
                        // Bytes that can never become UTF-8: replace them, go on.
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The complete characters so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Finds the earliest stop string that ends within the text added since `searched_len`
    /// bytes, and cuts the text before it. Returns whether one was found.
    pub fn cut_at_stop(&mut self, stops: &[String], searched_len: usize) -> bool {
        self.cut_at_stop_from(stops, searched_len, 0)
    }

    /// [`TextBuilder::cut_at_stop`], for a match that starts at byte `floor` or later (a
    /// reasoning model's answer, after its thinking).
    pub fn cut_at_stop_from(
        &mut self,
        stops: &[String],
        searched_len: usize,
        floor: usize,
    ) -> bool {
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        if longest == 0 || floor >= self.text.len() {
            return false;
        }
        let mut from = searched_len.saturating_sub(longest - 1).max(floor);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        match hit {
            Some(at) => {
                self.text.truncate(from + at);
                self.pending.clear();
                true
            }
            None => false,
        }
    }

    /// The final text; bytes of an unfinished character become U+FFFD.
    pub fn finish(mut self) -> String {
        if !self.pending.is_empty() {
            self.text.push_str(&String::from_utf8_lossy(&self.pending));
        }
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let mut t = TextBuilder::new();
        let snow = "☃".as_bytes(); // three bytes
        t.push(b"a");
        t.push(&snow[..1]);
        assert_eq!(t.text(), "a");
        t.push(&snow[1..2]);
        assert_eq!(t.text(), "a");
        t.push(&snow[2..]);
        assert_eq!(t.text(), "a☃");
        assert_eq!(t.finish(), "a☃");
    }

    #[test]
    fn replaces_invalid_bytes_and_goes_on() {
        let mut t = TextBuilder::new();
        t.push(b"x\xffy");
        assert_eq!(t.text(), "x\u{fffd}y");
    }

    #[test]
    fn unfinished_character_is_replaced_at_the_end() {
        let mut t = TextBuilder::new();
        t.push(b"ok\xe2\x98");
        assert_eq!(t.finish(), "ok\u{fffd}");
    }

    #[test]
    fn stop_string_across_tokens_is_cut() {
        let stops = vec!["END".to_owned()];
        let mut t = TextBuilder::new();
        let mut searched = 0;
        for piece in ["hello E", "N", "D more"] {
            t.push(piece.as_bytes());
            if t.cut_at_stop(&stops, searched) {
                break;
            }
            searched = t.text().len();
        }
        assert_eq!(t.text(), "hello ");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let stops = vec!["b".to_owned(), "a".to_owned()];
        let mut t = TextBuilder::new();
        t.push(b"xxab");
        assert!(t.cut_at_stop(&stops, 0));
        assert_eq!(t.text(), "xx");
    }

    #[test]
    fn no_stop_leaves_text_alone() {
        let mut t = TextBuilder::new();
        t.push("é…".as_bytes());
        assert!(!t.cut_at_stop(&["zz".to_owned()], 1));
        assert!(!t.cut_at_stop(&[], 0));
        assert_eq!(t.text(), "é…");
    }
}
