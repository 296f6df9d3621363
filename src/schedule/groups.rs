//! Exact mode's decode groups: which group sizes a run's calls of generated tokens take, chosen
//! from the start-up probe's classes, and how one step's generating slots are cut into calls
//! of those sizes.
//!
//! Within one class of sizes a row's bits do not depend on how many rows share its call, nor on
//! how deep its batch-mates are; so every call holds a number of rows from the chosen class,
//! whatever `--parallel` and whichever slots generate. A group too small for the class is
//! padded with dummy rows: a row of another sequence at its next position, asking for logits
//! like a real row (the output layer multiplies only the rows that do, so that is part of the
//! call's shape), dropped after the call.

use crate::engine::probe::{Class, Findings};

/// How generated tokens are grouped into decode calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeGroups {
    /// Every size the probe tried gives the rows of a lone call: groups of any size.
    Any,
    /// Calls of `lo` to `hi` rows: larger groups are cut into blocks of at most `hi` rows,
    /// smaller ones padded to `lo` rows.
    Fixed {
        /// Fewest rows a call holds.
        lo: usize,
        /// Most rows a call holds.
        hi: usize,
    },
    /// Each generating row in a call of its own: no class of two or more rows can be used.
    Alone,
}

impl DecodeGroups {
    /// The decision for the probe's `findings`, which never depends on `--parallel`: any shape
    /// where one class holds every size. Otherwise on a GPU (`gpu`), where a padded row costs
    /// almost nothing, the class that holds the most sizes from 2 on (the smaller sizes on a
    /// tie); on the CPU, where a padded row costs a full row, the class that holds 2. One row a
    /// call where that class cannot be used (its rows change with a deeper batch-mate or with
    /// their place in the call).
    pub fn decide(findings: &Findings, gpu: bool) -> Self {
        let classes = findings.classes();
        if let [only] = classes.as_slice() {
            if only.usable() {
                return Self::Any;
            }
        }
        let width = |c: &Class| (c.hi + 1).saturating_sub(c.lo.max(2));
        let chosen = if gpu {
            classes
                .iter()
                .filter(|c| c.usable() && width(c) > 0)
                .max_by_key(|c| (width(c), std::cmp::Reverse(c.lo)))
        } else {
            classes
                .iter()
                .find(|c| (c.lo..=c.hi).contains(&2))
                .filter(|c| c.usable())
        };
        match chosen {
            Some(c) => Self::Fixed { lo: c.lo, hi: c.hi },
            None => Self::Alone,
        }
    }

    /// The fewest and most rows a call holds, `max_rows` being the largest group tried.
    pub fn bounds(self, max_rows: usize) -> (usize, usize) {
        match self {
            Self::Any => (1, max_rows.max(1)),
            Self::Fixed { lo, hi } => (lo.max(1), hi.max(lo).max(1)),
            Self::Alone => (1, 1),
        }
    }
}

/// One row of a decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRow {
    /// Its sequence: a slot's, or past the slots, a pad stream's.
    pub seq: usize,
    /// A row that only gives the call its shape, dropped after it.
    pub dummy: bool,
}

/// Cuts one step's generating slots (`generating[i]` for slot `i`, whose sequence is `i`) into
/// decode calls of `lo` to `hi` rows, each generating slot in one call. Sequences `0..n_seqs`
/// may take dummy rows: the slots, then the pad streams (`n_seqs` must be at least `lo`).
///
/// Rows go in sequence order. llama.cpp decodes consecutive sequences in one pass and splits
/// a call at a gap, so with `lo` of 1 a call is up to `hi` generating slots, gaps allowed:
/// each pass then holds 1 to `hi` rows. From `lo` 2 on, a call is a run of consecutive
/// sequences: from a generating slot to the last generating one within `hi` sequences, dummy
/// rows in the gaps, and when that is shorter than `lo`, dummy rows after it (or, at the end
/// of the sequences, before it) up to `lo`.
pub fn calls(lo: usize, hi: usize, generating: &[bool], n_seqs: usize) -> Vec<Vec<CallRow>> {
    let slots: Vec<usize> = (0..generating.len()).filter(|&i| generating[i]).collect();
    let hi = hi.max(1);
    if lo <= 1 {
        return slots
            .chunks(hi)
            .map(|c| c.iter().map(|&seq| CallRow { seq, dummy: false }).collect())
            .collect();
    }
    let mut calls = Vec::new();
    let mut next = 0;
    while let Some(&first) = slots.get(next) {
        let taken = slots[next..]
            .iter()
            .take_while(|&&s| s < first + hi)
            .count();
        let last = slots[next + taken - 1];
        let (mut start, mut end) = (first, last + 1);
        if end - start < lo {
            end = start + lo;
            if end > n_seqs {
                end = n_seqs.max(last + 1);
                start = end.saturating_sub(lo);
            }
        }
        let real = &slots[next..next + taken];
        calls.push(
            (start..end)
                .map(|seq| CallRow {
                    seq,
                    dummy: !real.contains(&seq),
                })
                .collect(),
        );
        next += taken;
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::probe::Flaw;

    fn class(lo: usize, hi: usize) -> Class {
        Class { lo, hi, flaw: None }
    }

    fn flawed(n: usize, flaw: Flaw) -> Class {
        Class {
            lo: n,
            hi: n,
            flaw: Some(flaw),
        }
    }

    fn decide(classes: &[Class], gpu: bool) -> DecodeGroups {
        DecodeGroups::decide(&Findings::from_classes(classes), gpu)
    }

    #[test]
    fn one_class_of_every_size_is_any_shape() {
        for gpu in [false, true] {
            assert_eq!(decide(&[class(1, 32)], gpu), DecodeGroups::Any);
        }
        assert_eq!(
            decide(&[flawed(1, Flaw::Place)], false),
            DecodeGroups::Alone
        );
    }

    #[test]
    fn a_gpu_takes_the_widest_class_from_2_and_a_cpu_the_class_of_2() {
        let split = [class(1, 1), class(2, 8), class(9, 64)];
        assert_eq!(decide(&split, true), DecodeGroups::Fixed { lo: 9, hi: 64 });
        assert_eq!(decide(&split, false), DecodeGroups::Fixed { lo: 2, hi: 8 });
        // A class from 1 counts its sizes from 2; it needs no padding.
        let from_one = [class(1, 40), class(41, 64)];
        assert_eq!(
            decide(&from_one, true),
            DecodeGroups::Fixed { lo: 1, hi: 40 }
        );
        let three = [class(1, 2), class(3, 3), class(4, 32)];
        assert_eq!(decide(&three, false), DecodeGroups::Fixed { lo: 1, hi: 2 });
        assert_eq!(decide(&three, true), DecodeGroups::Fixed { lo: 4, hi: 32 });
        // Equal widths: the smaller sizes.
        let tie = [class(1, 1), class(2, 4), class(5, 7)];
        assert_eq!(decide(&tie, true), DecodeGroups::Fixed { lo: 2, hi: 4 });
    }

    #[test]
    fn rows_that_follow_a_deeper_batch_mate_are_decoded_alone() {
        let depth: Vec<Class> = std::iter::once(class(1, 1))
            .chain((2..=8).map(|n| flawed(n, Flaw::Depth)))
            .collect();
        for gpu in [false, true] {
            assert_eq!(decide(&depth, gpu), DecodeGroups::Alone);
        }
        // Flawed sizes are left out; a GPU still finds the usable ones.
        let some = [
            class(1, 1),
            flawed(2, Flaw::Depth),
            flawed(3, Flaw::Depth),
            class(4, 16),
        ];
        assert_eq!(decide(&some, false), DecodeGroups::Alone);
        assert_eq!(decide(&some, true), DecodeGroups::Fixed { lo: 4, hi: 16 });
    }

    /// The calls of one step, as (first sequence, rows, dummy rows).
    fn shapes(
        lo: usize,
        hi: usize,
        generating: &[usize],
        slots: usize,
        n_seqs: usize,
    ) -> Vec<(usize, usize, usize)> {
        let mut flags = vec![false; slots];
        for &g in generating {
            flags[g] = true;
        }
        let calls = calls(lo, hi, &flags, n_seqs);
        let mut seen: Vec<usize> = calls
            .iter()
            .flatten()
            .filter(|r| !r.dummy)
            .map(|r| r.seq)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, generating, "every generating slot once");
        calls
            .iter()
            .map(|c| {
                assert!(c.windows(2).all(|w| w[0].seq < w[1].seq), "{c:?}");
                (c[0].seq, c.len(), c.iter().filter(|r| r.dummy).count())
            })
            .collect()
    }

    #[test]
    fn calls_are_padded_to_lo_and_cut_at_hi() {
        // Consecutive sequences from 2 on: a lone slot padded with the pad streams after it.
        assert_eq!(shapes(4, 8, &[0], 1, 4), vec![(0, 4, 3)]);
        // Gaps are filled; more than 8 sequences are cut.
        assert_eq!(
            shapes(4, 8, &[0, 2, 9, 10, 11], 12, 13),
            vec![(0, 4, 2), (9, 4, 1)]
        );
        assert_eq!(
            shapes(2, 3, &[0, 1, 2, 3], 4, 5),
            vec![(0, 3, 0), (3, 2, 1)]
        );
        // At the end of the sequences the padding comes before.
        assert_eq!(shapes(4, 8, &[5], 6, 7), vec![(3, 4, 3)]);
        // From 1 on, no dummies: at most `hi` rows a call, gaps left to llama.cpp.
        assert_eq!(shapes(1, 2, &[0, 3, 5], 6, 7), vec![(0, 2, 0), (5, 1, 0)]);
        assert_eq!(shapes(1, 1, &[1, 4], 6, 7), vec![(1, 1, 0), (4, 1, 0)]);
        assert!(shapes(4, 8, &[], 6, 7).is_empty());
    }
}
