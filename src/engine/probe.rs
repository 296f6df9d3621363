//! The decode-group probe: how a decoded row's bits depend on the rows that share its call.

use super::{Engine, EngineError, SeqId, Session, Token};

/// Positions of context the decode-group probe fills before it compares rows.
const PROBE_DEPTH: u32 = 16;

/// The largest decode group the probe compares with the pair: the most rows a decode call of
/// generated tokens holds.
const MAX_PROBED_GROUP: usize = 32;

/// How a decoded row's logits depend on the number of rows in its decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowDependence {
    /// Bit-identical at every group size probed, the lone row included.
    None,
    /// Every group of 2 up to this many rows gives the same row; a lone row (or a larger
    /// group) may not.
    SameFrom2UpTo(usize),
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

impl Session<'_> {
    pub(super) fn probe_groups(&mut self, seqs: &[SeqId]) -> Result<RowDependence, EngineError> {
        let Some(&first) = seqs.first() else {
            return Ok(RowDependence::None);
        };
        // Context first: at position 0 a row attends to one key, whose softmax weight is
        // exactly 1 whatever the kernel, which would hide attention kernels that sum over the
        // keys in an order that depends on the row count.
        let n_vocab = u32::try_from(self.model.model.n_vocab())
            .unwrap_or(1)
            .max(1);
        for p in 0..PROBE_DEPTH {
            let token = i32::try_from((p * 7919 + 13) % n_vocab).unwrap_or(0);
            self.push(Token(token), p, first, false)?;
        }
        self.decode()?;
        for &seq in &seqs[1..] {
            self.share_prefix(first, seq)?;
        }
        let alone = self.probe_rows(&seqs[..1])?;
        let mut invariant = true;
        for size in [2, 4, 8, 16, 32].into_iter().filter(|&n| n <= seqs.len()) {
            let rows = self.probe_rows(&seqs[..size])?;
            if !rows.iter().all(|r| same_bits(r, &alone[0])) {
                invariant = false;
                break;
            }
        }
        if invariant {
            return Ok(RowDependence::None);
        }
        // Two or more sequences, since a group of two differed.
        let pair = self.probe_rows(&seqs[..2])?;
        let mut up_to = 2;
        while up_to < seqs.len().min(MAX_PROBED_GROUP) {
            let rows = self.probe_rows(&seqs[..=up_to])?;
            if !rows.iter().all(|r| same_bits(r, &pair[0])) {
                break;
            }
            up_to += 1;
        }
        Ok(RowDependence::SameFrom2UpTo(up_to))
    }

    /// Decodes the probe token at [`PROBE_DEPTH`] in every sequence of `group` in one call and
    /// returns each row's logits, then drops the token again.
    fn probe_rows(&mut self, group: &[SeqId]) -> Result<Vec<Vec<f32>>, EngineError> {
        for &seq in group {
            self.push(Token(0), PROBE_DEPTH, seq, true)?;
        }
        let decoded = self.decode();
        let rows = (0..group.len())
            .map(|i| self.logits(i32::try_from(i).unwrap_or(0)))
            .collect();
        for &seq in group {
            self.truncate_seq(seq, PROBE_DEPTH)?;
        }
        decoded.map(|()| rows)
    }
}
