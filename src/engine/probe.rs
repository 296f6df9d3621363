//! The decode-group probe: how a decoded row's bits depend on the rows that share its call.
//!
//! Kernels may pick their matrix-product and attention paths by the number of rows in a call
//! (GPU kernels do), and llama.cpp sizes a call's attention pass by the deepest KV stream in it
//! (its used cells, padded to 256). So the probe decodes one token in every group size from 1 to
//! the largest group a run makes. In each call of two or more rows, shallow rows ([`SHALLOW`]
//! positions of context) sit beside rows more than 256 cells deeper ([`DEEP`]), first and last
//! from 3 rows on, so that a kernel that treats the first rows of a call apart from its tail
//! (CPU matrix products do, in blocks of 4 rows) shows it; the same size is decoded again with
//! shallow rows only. Each row is compared with the other rows of its depth in the call, with
//! its depth's rows one size down (the lone rows at size 1), and the shallow rows with the
//! all-shallow call.
//!
//! [`search`] is pure over a "decode this group, give me its rows" callback; [`probe`] drives
//! it through the [`Engine`] seam, so the scheduler's scripted fake runs the same search.

use super::state::SeqState;
use super::{Engine, EngineError, SeqId, Token};

/// Positions of context a shallow row sees. Not 0: at position 0 a row attends to one key,
/// whose softmax weight is exactly 1 whatever the kernel, which would hide attention kernels
/// that sum over the keys in an order that depends on the row count.
pub const SHALLOW: u32 = 16;

/// Positions of context a deep row sees: more than 256 cells beyond a shallow row, so a call
/// that holds it attends over the next 256-cell step.
pub const DEEP: u32 = SHALLOW + 257;

/// KV cells each probe stream needs: the deep context and its token, in llama.cpp's 256-cell
/// steps.
pub const STREAM_CELLS: u32 = 512;

/// The most group sizes [`Findings`] can hold.
pub const MAX_GROUP: usize = 64;

/// One probe call: a deep row first when `deep_first` is set, then `shallow` rows, then a deep
/// row when `deep_last` is set. The callback returns the rows' logits in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// A first row at [`DEEP`] positions of context.
    pub deep_first: bool,
    /// Rows at [`SHALLOW`] positions.
    pub shallow: usize,
    /// A last row at [`DEEP`] positions.
    pub deep_last: bool,
}

impl Group {
    /// `n` rows: shallow ones only, or beside deep ones (last at 2 rows, first and last from 3).
    fn of(n: usize, deep: bool) -> Self {
        let ends = match (deep, n) {
            (false, _) => 0,
            (true, 0..=2) => n.min(1),
            (true, _) => 2,
        };
        Self {
            deep_first: ends == 2,
            shallow: n - ends,
            deep_last: ends >= 1,
        }
    }

    /// Rows in the call.
    pub fn rows(self) -> usize {
        self.shallow + usize::from(self.deep_first) + usize::from(self.deep_last)
    }

    /// Whether row `i` is a deep one.
    pub fn is_deep(self, i: usize) -> bool {
        (self.deep_first && i == 0) || (self.deep_last && i + 1 == self.rows())
    }
}

/// Consecutive group sizes whose rows are bit-identical, at both depths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Its smallest size.
    pub lo: usize,
    /// Its largest size.
    pub hi: usize,
    /// Why its sizes cannot be used, if they cannot. Such a class holds one size.
    pub flaw: Option<Flaw>,
}

impl Class {
    /// Whether fixed-shape calls may take its sizes.
    pub fn usable(self) -> bool {
        self.flaw.is_none()
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)?;
        } else {
            write!(f, "{}-{}", self.lo, self.hi)?;
        }
        match self.flaw {
            Some(Flaw::Depth) => f.write_str(" (rows change with a deeper batch-mate)"),
            Some(Flaw::Place) => f.write_str(" (rows differ by their place in the call)"),
            None => Ok(()),
        }
    }
}

/// Why a group size cannot be used for fixed-shape calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// A shallow row's bits changed when a deep row shared its call.
    Depth,
    /// Rows of one depth in one call differed from each other.
    Place,
}

/// What the probe found, size by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Findings {
    tried: usize,
    /// Bit `n - 1`: a class starts at size `n`.
    starts: u64,
    /// Bit `n - 1`: at size `n` a shallow row changed beside a deep one.
    depth: u64,
    /// Bit `n - 1`: at size `n` rows of one depth differed by their place.
    place: u64,
}

impl Findings {
    /// The sizes tried: every one from 1 to this.
    pub fn tried(&self) -> usize {
        self.tried
    }

    fn bit(n: usize) -> u64 {
        1 << (n - 1)
    }

    /// The classes, smallest sizes first; together they cover 1 to [`Self::tried`].
    pub fn classes(&self) -> Vec<Class> {
        let mut classes: Vec<Class> = Vec::new();
        for n in 1..=self.tried {
            let flaw = if self.depth & Self::bit(n) != 0 {
                Some(Flaw::Depth)
            } else if self.place & Self::bit(n) != 0 {
                Some(Flaw::Place)
            } else {
                None
            };
            match classes.last_mut() {
                Some(last) if self.starts & Self::bit(n) == 0 => last.hi = n,
                _ => classes.push(Class { lo: n, hi: n, flaw }),
            }
        }
        classes
    }

    /// Findings from their classes: `classes` must cover 1 to their last size in order; a
    /// flawed class holds one size.
    #[cfg(test)]
    pub fn from_classes(classes: &[Class]) -> Self {
        let mut f = Self {
            tried: classes.last().map_or(1, |c| c.hi).min(MAX_GROUP),
            starts: 0,
            depth: 0,
            place: 0,
        };
        for c in classes.iter().filter(|c| c.lo <= f.tried) {
            f.starts |= Self::bit(c.lo);
            for n in c.lo..=c.hi.min(f.tried) {
                match c.flaw {
                    Some(Flaw::Depth) => f.depth |= Self::bit(n),
                    Some(Flaw::Place) => f.place |= Self::bit(n),
                    None => {}
                }
            }
        }
        f
    }
}

impl std::fmt::Display for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let classes: Vec<String> = self.classes().iter().map(Class::to_string).collect();
        write!(f, "{}", classes.join(" | "))
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn all_same(rows: &[Vec<f32>]) -> bool {
    rows.windows(2).all(|w| same_bits(&w[0], &w[1]))
}

/// Decodes every group size from 1 to `max_group` (at most [`MAX_GROUP`]) through `decode`,
/// and sorts the sizes into classes. Size 1 is a lone shallow row and a lone deep row; each
/// larger size is a call of shallow rows beside deep ones, then a call of shallow rows only.
/// A size joins the class of the size below when its rows of each depth are the same bits as
/// those of the size below; a size whose rows change with a deep batch-mate, or differ by
/// their place in the call, is a class of its own that cannot be used.
///
/// # Errors
/// The first error of `decode`.
pub fn search<E>(
    max_group: usize,
    mut decode: impl FnMut(Group) -> Result<Vec<Vec<f32>>, E>,
) -> Result<Findings, E> {
    let tried = max_group.clamp(1, MAX_GROUP);
    let mut found = Findings {
        tried,
        starts: 1,
        depth: 0,
        place: 0,
    };
    let one = |mut rows: Vec<Vec<f32>>| rows.pop().unwrap_or_default();
    let mut below = (
        one(decode(Group::of(1, false))?),
        one(decode(Group {
            deep_first: false,
            shallow: 0,
            deep_last: true,
        })?),
    );
    let mut flawed_below = false;
    for n in 2..=tried {
        let group = Group::of(n, true);
        let (deep_rows, shallow_rows): (Vec<_>, Vec<_>) = decode(group)?
            .into_iter()
            .enumerate()
            .partition(|(i, _)| group.is_deep(*i));
        let deep_rows: Vec<Vec<f32>> = deep_rows.into_iter().map(|(_, r)| r).collect();
        let shallow_rows: Vec<Vec<f32>> = shallow_rows.into_iter().map(|(_, r)| r).collect();
        let shallow_only = decode(Group::of(n, false))?;
        let bit = Findings::bit(n);
        let shallow = shallow_rows.first().cloned().unwrap_or_default();
        let deep = deep_rows.first().cloned().unwrap_or_default();
        if !all_same(&deep_rows) || !all_same(&shallow_rows) || !all_same(&shallow_only) {
            found.place |= bit;
        } else if !shallow_only.first().is_some_and(|r| same_bits(r, &shallow)) {
            found.depth |= bit;
        }
        let flawed = (found.place | found.depth) & bit != 0;
        if flawed || flawed_below || !same_bits(&shallow, &below.0) || !same_bits(&deep, &below.1) {
            found.starts |= bit;
        }
        below = (shallow, deep);
        flawed_below = flawed;
    }
    Ok(found)
}

/// Runs [`search`] on `engine`, whose sequences `0..=max_group` must be empty, each with a KV
/// stream of at least [`STREAM_CELLS`] cells and a batch of at least `max_group` tokens. The
/// last of them holds the deep context; the others take a copy cut to the shallow context. A
/// call of `n` rows decodes in consecutive sequences (llama.cpp keeps a group in one call only
/// then): shallow rows from sequence 0 up, or the `n` sequences that end at the deep one, the
/// first of them given the deep context for the call when the group starts deep. Context
/// tokens are drawn from `n_vocab`. The sequences are left empty.
///
/// # Errors
/// When a decode or a cache operation fails.
pub fn probe<E: Engine>(
    engine: &mut E,
    max_group: usize,
    n_vocab: u32,
) -> Result<Findings, EngineError> {
    let tried = max_group.clamp(1, MAX_GROUP);
    let deep = SeqId::try_from(tried).unwrap_or(SeqId::MAX);
    let result = prepare(engine, deep, n_vocab)
        .and_then(|()| search(tried, |group| decode_group(engine, group, deep)));
    for seq in 0..=deep {
        engine.clear_seq(seq)?;
    }
    result
}

/// Gives `deep` the deep context and every sequence below it the shallow part. Only the shallow
/// part is computed where the engine's states can be read and written as llama.cpp's: the deep
/// cells repeat its cells (see [`SeqState::repeated`]); elsewhere the deep context is
/// prefilled.
fn prepare<E: Engine>(engine: &mut E, deep: SeqId, n_vocab: u32) -> Result<(), EngineError> {
    prefill(engine, deep, 0..SHALLOW, n_vocab)?;
    if !deepen(engine, deep) {
        engine.clear_seq(deep)?;
        prefill(engine, deep, 0..DEEP, n_vocab)?;
    }
    for seq in 0..deep {
        engine.share_prefix(deep, seq)?;
        engine.truncate_seq(seq, SHALLOW)?;
    }
    Ok(())
}

/// Decodes context tokens at `positions` into `seq`, a batch at a time, without logits.
fn prefill<E: Engine>(
    engine: &mut E,
    seq: SeqId,
    positions: std::ops::Range<u32>,
    n_vocab: u32,
) -> Result<(), EngineError> {
    let capacity = engine.batch_capacity().max(1);
    let end = positions.end;
    for p in positions {
        let token = i32::try_from((p * 7919 + 13) % n_vocab.max(1)).unwrap_or(0);
        engine.push(Token(token), p, seq, false)?;
        if engine.batch_len() == capacity || p + 1 == end {
            engine.decode()?;
        }
    }
    Ok(())
}

/// Makes `seq`'s shallow context [`DEEP`] cells deep by repeating its cells; false where its
/// state is not llama.cpp's (a scripted engine) or is refused.
fn deepen<E: Engine>(engine: &mut E, seq: SeqId) -> bool {
    let Ok(state) = engine.seq_state(seq) else {
        return false;
    };
    let deeper = [1, 2]
        .into_iter()
        // The session's own bytes, of its own types: checked as it gave them.
        .find_map(|sections| SeqState::parse(&state, sections, None).ok())
        .and_then(|s| s.repeated(DEEP).ok());
    deeper.is_some_and(|d| engine.restore_seq_state(seq, &d).is_ok())
}

/// Decodes the probe token in the sequences of `group` in one call, every row asking for
/// logits, and returns the rows; then drops the token again.
fn decode_group<E: Engine>(
    engine: &mut E,
    group: Group,
    deep: SeqId,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let count = SeqId::try_from(group.rows()).unwrap_or(SeqId::MAX);
    let first = if group.deep_last { deep + 1 - count } else { 0 };
    if group.deep_first && first != deep {
        engine.share_prefix(deep, first)?;
    }
    let rows: Vec<(SeqId, u32)> = (0..group.rows())
        .map(|i| {
            let seq = first + SeqId::try_from(i).unwrap_or(SeqId::MAX);
            (seq, if group.is_deep(i) { DEEP } else { SHALLOW })
        })
        .collect();
    let mut indices = Vec::with_capacity(rows.len());
    for &(seq, pos) in &rows {
        indices.push(engine.push(Token(0), pos, seq, true)?);
    }
    let decoded = engine.decode();
    let logits = indices.iter().map(|&i| engine.logits(i)).collect();
    for &(seq, pos) in &rows {
        // A sequence made deep for the call goes back to the shallow context.
        let keep = if seq == deep { pos } else { SHALLOW };
        engine.truncate_seq(seq, keep)?;
    }
    decoded.map(|()| logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decode callback whose row bits come from `kernel(rows in the call, the row is deep,
    /// the call holds a deep row, place)`.
    fn scripted(
        kernel: impl Fn(usize, bool, bool, usize) -> u32,
    ) -> impl FnMut(Group) -> Result<Vec<Vec<f32>>, ()> {
        move |g: Group| {
            let n = g.rows();
            let has_deep = g.deep_first || g.deep_last;
            Ok((0..n)
                .map(|i| {
                    let base = if g.is_deep(i) { 7.0f32 } else { 3.0 };
                    vec![base, f32::from_bits(kernel(n, g.is_deep(i), has_deep, i))]
                })
                .collect())
        }
    }

    fn classes(max: usize, kernel: impl Fn(usize, bool, bool, usize) -> u32) -> String {
        search(max, scripted(kernel)).unwrap().to_string()
    }

    #[test]
    fn every_size_is_tried_and_sorted_into_classes() {
        let mut sizes = Vec::new();
        let found = search(8, |g: Group| {
            sizes.push(g);
            scripted(|_, _, _, _| 0)(g)
        })
        .unwrap();
        assert_eq!(found.tried(), 8);
        assert_eq!(found.to_string(), "1-8");
        // Lone rows, then each size twice: beside deep rows and shallow only.
        assert_eq!(sizes.len(), 2 + 2 * 7);
        for n in 2..=8 {
            let mixed = Group::of(n, true);
            assert!(sizes.contains(&mixed));
            assert!(sizes.contains(&Group::of(n, false)));
            assert_eq!(mixed.rows(), n);
            assert!(mixed.is_deep(n - 1) && mixed.is_deep(0) == (n > 2));
            assert_eq!(mixed.shallow, n - if n > 2 { 2 } else { 1 });
        }
    }

    #[test]
    fn kernels_that_change_at_some_sizes_split_the_classes() {
        assert_eq!(classes(8, |n, _, _, _| u32::from(n == 3)), "1-2 | 3 | 4-8");
        assert_eq!(
            classes(10, |n, _, _, _| u32::from((5..=7).contains(&n))),
            "1-4 | 5-7 | 8-10"
        );
        let gpu = |n: usize, _, _, _| match n {
            1 => 1,
            2..=8 => 2,
            _ => 3,
        };
        assert_eq!(classes(64, gpu), "1 | 2-8 | 9-64");
        // Only the deep rows change at 4: still a new class.
        assert_eq!(
            classes(6, |n, deep, _, _| u32::from(deep && n >= 4)),
            "1-3 | 4-6"
        );
    }

    #[test]
    fn rows_that_follow_a_deep_batch_mate_or_their_place_are_flawed() {
        // A shallow row changes when the call holds a deep row, from 3 rows on.
        let found = search(
            5,
            scripted(|n, _, has_deep, _| u32::from(has_deep && n >= 3)),
        )
        .unwrap();
        assert_eq!(
            found
                .classes()
                .iter()
                .map(|c| (c.lo, c.hi, c.flaw))
                .collect::<Vec<_>>(),
            vec![
                (1, 2, None),
                (3, 3, Some(Flaw::Depth)),
                (4, 4, Some(Flaw::Depth)),
                (5, 5, Some(Flaw::Depth))
            ]
        );
        let found = search(
            4,
            scripted(|n, _, _, place| u32::from(n == 4 && place == 1)),
        )
        .unwrap();
        assert_eq!(
            found.to_string(),
            "1-3 | 4 (rows differ by their place in the call)"
        );
        assert_eq!(Findings::from_classes(&found.classes()), found);
    }

    #[test]
    fn a_block_path_that_only_deep_rows_show_is_found_at_both_ends() {
        // Rows in whole blocks of 4 take another path than the tail, and only deep rows' bits
        // show it (as Gemma 3's on this project's CPU): 4 and 8 rows are all blocks, 5 to 7 mix.
        let blocks = |n: usize, deep: bool, _, place: usize| u32::from(deep && place < n / 4 * 4);
        let flawed = " (rows differ by their place in the call)";
        assert_eq!(
            classes(9, blocks),
            format!("1-3 | 4 | 5{flawed} | 6{flawed} | 7{flawed} | 8 | 9{flawed}")
        );
    }

    #[test]
    fn the_sizes_tried_are_capped() {
        assert_eq!(classes(200, |_, _, _, _| 0), "1-64");
        assert_eq!(classes(0, |_, _, _, _| 0), "1");
    }
}
