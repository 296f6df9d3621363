//! llama.cpp's per-sequence KV state, parsed whole.
//!
//! A state is a header (magic, source sequence id), then one section per KV cache: one for a
//! plain cache, two (full-attention layers, then sliding-window layers) for an interleaved
//! sliding-window cache. A section is the cache's stream count, then one block per stream:
//!
//! ```text
//! cell_count u32 | cell_count × (pos i32, n_seq_id u32, seq_id i32 × n_seq_id)
//! | v_trans u32 | n_layer u32 | n_rot_k u32 | n_rot_v u32
//! | n_layer × (k_type i32, k_row_bytes u64, cell_count rows)
//! | n_layer × (v_type i32, v_row_bytes u64, cell_count rows)                  (v_trans = 0)
//! | n_layer × (v_type i32, v_elem_bytes u32, n_embd u32, n_embd × cell_count) (v_trans = 1)
//! ```
//!
//! (a block with no cells is its `cell_count` alone). The parse must account for every byte,
//! so a layout this build was not written for (recurrent state, per-cell extensions, another
//! llama.cpp version) is refused instead of misread. Stored states keep the one-stream form, so
//! a state written with one `--parallel` or KV layout restores into any other.

use std::ops::Range;

use super::KvTypes;

/// llama.cpp's sequence state magic.
const MAGIC: u32 = 0xaf14_3cd8;
/// Bytes of the magic and sequence id before the first section.
const HEADER: usize = 8;
/// Layers a block may declare; far beyond any model, it bounds what a bad length can claim.
const MAX_LAYERS: u32 = 4096;

/// How a model's KV memory is laid out, as far as saved states are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// One KV cache for every layer.
    Kv,
    /// Interleaved sliding-window attention: a cache for the full-attention layers and one for
    /// the sliding-window layers (Gemma 2 and 3).
    KvSwa,
    /// A layout whose states this build does not parse (recurrent, hybrid, multi-dimensional
    /// positions): prefixes are shared in memory only.
    Untested(&'static str),
}

impl MemoryKind {
    /// KV cache sections in a state, for the kinds that can be saved.
    pub fn sections(self) -> Option<usize> {
        match self {
            Self::Kv => Some(1),
            Self::KvSwa => Some(2),
            Self::Untested(_) => None,
        }
    }
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kv => f.write_str("kv"),
            Self::KvSwa => f.write_str("kv+swa"),
            Self::Untested(what) => write!(f, "untested ({what})"),
        }
    }
}

/// Why a state's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sequence state at byte {at}: {what}")]
pub struct StateError {
    /// Where the parse stopped.
    pub at: usize,
    /// What was wrong there.
    pub what: String,
}

/// One parsed section: its stream blocks, as byte ranges of the state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Section {
    blocks: Vec<Range<usize>>,
}

impl Section {
    /// The block holding cells; `None` when every stream is empty.
    fn cells(&self, bytes: &[u8]) -> Result<Option<Range<usize>>, StateError> {
        let mut full = self.blocks.iter().filter(|b| b.len() > 4);
        let first = full.next().cloned();
        if let Some(second) = full.next() {
            return Err(StateError {
                at: second.start,
                what: "a sequence has cells in two streams".into(),
            });
        }
        debug_assert!(first.as_ref().is_none_or(|b| b.end <= bytes.len()));
        Ok(first)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// The key and value types the state must hold; any where `None`.
    kv: Option<KvTypes>,
}

impl Reader<'_> {
    fn fail<T>(&self, what: impl Into<String>) -> Result<T, StateError> {
        Err(StateError {
            at: self.at,
            what: what.into(),
        })
    }

    fn take(&mut self, n: u64) -> Result<(), StateError> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return self.fail(format!("needs {n} more bytes, {left} left"));
        }
        self.at += n as usize;
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let Some(b) = self.bytes.get(self.at..self.at + 4) else {
            return self.fail("truncated");
        };
        self.at += 4;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn i32(&mut self) -> Result<i32, StateError> {
        self.u32().map(|v| v as i32)
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        let Some(b) = self.bytes.get(self.at..self.at + 8) else {
            return self.fail("truncated");
        };
        self.at += 8;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A layer's key (`value` false) or value type, checked against the expected one.
    fn kv_type(&mut self, value: bool) -> Result<(), StateError> {
        let t = self.i32()?;
        let Some(kv) = self.kv else { return Ok(()) };
        let (what, want) = if value {
            ("value", kv.v)
        } else {
            ("key", kv.k)
        };
        if t != want.ggml() {
            return self.fail(format!(
                "{what} type {t}, expected {} ({})",
                want.name(),
                want.ggml()
            ));
        }
        Ok(())
    }

    /// `rows × row_bytes` bytes, with the product checked.
    fn rows(&mut self, rows: u64, row_bytes: u64) -> Result<(), StateError> {
        match rows.checked_mul(row_bytes) {
            Some(n) => self.take(n),
            None => self.fail("row bytes overflow"),
        }
    }

    fn block(&mut self, seq: i32) -> Result<Range<usize>, StateError> {
        let start = self.at;
        let cells = u64::from(self.u32()?);
        if cells == 0 {
            return Ok(start..self.at);
        }
        for _ in 0..cells {
            let pos = self.i32()?;
            let n_seq = self.u32()?;
            if pos < 0 || n_seq != 1 {
                return self.fail(format!(
                    "cell at position {pos} with {n_seq} sequences; a sequence state has one"
                ));
            }
            let id = self.i32()?;
            if id != seq {
                return self.fail(format!("cell of sequence {id} in the state of {seq}"));
            }
        }
        let v_trans = self.u32()?;
        let n_layer = self.u32()?;
        if v_trans > 1 || n_layer == 0 || n_layer > MAX_LAYERS {
            return self.fail(format!("v_trans {v_trans}, {n_layer} layers"));
        }
        self.u32()?; // n_rot_k
        self.u32()?; // n_rot_v
        for _ in 0..n_layer {
            self.kv_type(false)?;
            let row = self.u64()?;
            self.rows(cells, row)?;
        }
        for _ in 0..n_layer {
            self.kv_type(true)?;
            if v_trans == 0 {
                let row = self.u64()?;
                self.rows(cells, row)?;
            } else {
                let elem = u64::from(self.u32()?);
                let n_embd = u64::from(self.u32()?);
                self.rows(cells, elem.saturating_mul(n_embd))?;
            }
        }
        Ok(start..self.at)
    }
}

/// Writes `block` (a parsed stream block with cells) to `out` with `cells` cells: cell `i` at
/// position `i`, its key and value rows those of the block's cell `i % n`.
fn repeat_block(block: &[u8], cells: u32, out: &mut Vec<u8>) -> Result<(), StateError> {
    let mut r = Reader {
        bytes: block,
        at: 0,
        kv: None,
    };
    let n = r.u32()? as usize;
    let meta = r.at;
    r.take(12 * n as u64)?;
    let seq = &block[meta + 8..meta + 12];
    let fields = r.at;
    let v_trans = r.u32()?;
    let n_layer = r.u32()?;
    r.take(8)?; // n_rot_k, n_rot_v
    out.extend_from_slice(&cells.to_le_bytes());
    for p in 0..cells {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(seq);
    }
    out.extend_from_slice(&block[fields..r.at]);
    // Rows of `width` bytes, one per cell, repeated to `cells` rows.
    let rows = |r: &mut Reader<'_>, width: usize, out: &mut Vec<u8>| {
        let start = r.at;
        r.rows(n as u64, width as u64)?;
        for i in 0..cells as usize {
            let at = start + (i % n) * width;
            out.extend_from_slice(&block[at..at + width]);
        }
        Ok::<(), StateError>(())
    };
    for _ in 0..n_layer {
        let head = r.at;
        r.take(4)?;
        let width = r.u64()? as usize;
        out.extend_from_slice(&block[head..r.at]);
        rows(&mut r, width, out)?;
    }
    for _ in 0..n_layer {
        let head = r.at;
        r.take(4)?;
        if v_trans == 0 {
            let width = r.u64()? as usize;
            out.extend_from_slice(&block[head..r.at]);
            rows(&mut r, width, out)?;
        } else {
            // Transposed: for each value element, one entry per cell.
            let elem = r.u32()? as usize;
            let n_embd = r.u32()?;
            out.extend_from_slice(&block[head..r.at]);
            for _ in 0..n_embd {
                rows(&mut r, elem, out)?;
            }
        }
    }
    Ok(())
}

/// A parsed sequence state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqState<'a> {
    bytes: &'a [u8],
    sections: Vec<Section>,
}

impl<'a> SeqState<'a> {
    /// Parses a sequence state of `sections` KV caches, every byte accounted for, its keys
    /// and values of the types `kv` (any types where `None`).
    ///
    /// # Errors
    /// A [`StateError`] that says where and what did not match.
    pub fn parse(
        bytes: &'a [u8],
        sections: usize,
        kv: Option<KvTypes>,
    ) -> Result<Self, StateError> {
        let mut r = Reader { bytes, at: 0, kv };
        if r.u32()? != MAGIC {
            return r.fail("not a llama.cpp sequence state (magic)");
        }
        let seq = r.i32()?;
        debug_assert_eq!(r.at, HEADER);
        let mut parsed = Vec::with_capacity(sections);
        for _ in 0..sections {
            let n_stream = r.u32()?;
            if n_stream == 0 || n_stream > 4096 {
                return r.fail(format!("{n_stream} streams"));
            }
            let blocks = (0..n_stream)
                .map(|_| r.block(seq))
                .collect::<Result<_, _>>()?;
            parsed.push(Section { blocks });
        }
        if r.at != bytes.len() {
            return r.fail(format!(
                "{} bytes left after {sections} KV section(s)",
                bytes.len() - r.at
            ));
        }
        Ok(Self {
            bytes,
            sections: parsed,
        })
    }

    /// Streams per section (the same in every section).
    pub fn streams(&self) -> usize {
        self.sections.first().map_or(0, |s| s.blocks.len())
    }

    /// The one-stream form: each section's stream count set to 1, keeping the one block that
    /// holds this sequence's cells.
    ///
    /// # Errors
    /// When a section holds cells in more than one stream.
    pub fn to_one_stream(&self) -> Result<Vec<u8>, StateError> {
        self.laid_out(1, 0)
    }

    /// This state, whose cells sit in at most one stream per section, laid out for a cache of
    /// `streams` streams with the cells in stream `stream`.
    ///
    /// # Errors
    /// When `stream` is out of range, or a section holds cells in more than one stream.
    pub fn to_streams(&self, streams: u32, stream: u32) -> Result<Vec<u8>, StateError> {
        if stream >= streams {
            return Err(StateError {
                at: 0,
                what: format!("stream {stream} of {streams}"),
            });
        }
        self.laid_out(streams, stream)
    }

    /// The one-stream form with `cells` cells at positions `0..cells`, the cells of this state
    /// repeated in turn, keys and values alike: a deep stream of real-valued cells without
    /// computing them, for the decode-group probe, which compares kernels and not meanings.
    ///
    /// # Errors
    /// When a section holds cells in more than one stream, or none at all.
    pub fn repeated(&self, cells: u32) -> Result<Vec<u8>, StateError> {
        let mut out = self.bytes[..HEADER].to_vec();
        for section in &self.sections {
            let Some(block) = section.cells(self.bytes)? else {
                return Err(StateError {
                    at: HEADER,
                    what: "no cells to repeat".into(),
                });
            };
            out.extend_from_slice(&1u32.to_le_bytes());
            repeat_block(&self.bytes[block.clone()], cells, &mut out).map_err(|e| StateError {
                at: block.start + e.at,
                what: e.what,
            })?;
        }
        Ok(out)
    }

    fn laid_out(&self, streams: u32, stream: u32) -> Result<Vec<u8>, StateError> {
        let empty = 0u32.to_le_bytes();
        let mut out = Vec::with_capacity(self.bytes.len() + 4 * streams as usize);
        out.extend_from_slice(&self.bytes[..HEADER]);
        for section in &self.sections {
            out.extend_from_slice(&streams.to_le_bytes());
            let cells = section.cells(self.bytes)?;
            for s in 0..streams {
                match &cells {
                    Some(block) if s == stream => out.extend_from_slice(&self.bytes[block.clone()]),
                    _ => out.extend_from_slice(&empty),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::KvType;

    const GGML_TYPE_F16: i32 = 1;
    const F16: Option<KvTypes> = Some(KvTypes {
        k: KvType::F16,
        v: KvType::F16,
    });

    fn w(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A block of `cells` cells of sequence 5 over 2 layers, K rows and V rows of 4 bytes.
    fn block(cells: u32, v_trans: bool) -> Vec<u8> {
        if cells == 0 {
            return w(&[0]);
        }
        let mut b = w(&[cells]);
        for p in 0..cells {
            b.extend(w(&[p, 1, 5]));
        }
        b.extend(w(&[u32::from(v_trans), 2, 64, 64]));
        for _ in 0..2 {
            b.extend(w(&[GGML_TYPE_F16 as u32, 4, 0]));
            b.extend(vec![7u8; 4 * cells as usize]);
        }
        for _ in 0..2 {
            if v_trans {
                b.extend(w(&[GGML_TYPE_F16 as u32, 2, 2]));
                b.extend(vec![8u8; 4 * cells as usize]);
            } else {
                b.extend(w(&[GGML_TYPE_F16 as u32, 4, 0]));
                b.extend(vec![8u8; 4 * cells as usize]);
            }
        }
        b
    }

    /// A state of `sections` sections over `streams` streams, cells in `stream`.
    fn state(sections: usize, streams: u32, stream: u32, cells: u32, v_trans: bool) -> Vec<u8> {
        let mut s = w(&[MAGIC, 5]);
        for _ in 0..sections {
            s.extend(w(&[streams]));
            for k in 0..streams {
                if k == stream {
                    s.extend(block(cells, v_trans));
                } else {
                    s.extend(w(&[0]));
                }
            }
        }
        s
    }

    #[test]
    fn layouts_convert_both_ways_for_one_and_two_sections() {
        for sections in [1, 2] {
            for v_trans in [false, true] {
                let three = state(sections, 3, 1, 3, v_trans);
                let parsed = SeqState::parse(&three, sections, F16).unwrap();
                assert_eq!(parsed.streams(), 3);
                let one = parsed.to_one_stream().unwrap();
                assert_eq!(one, state(sections, 1, 0, 3, v_trans));
                let back = SeqState::parse(&one, sections, F16).unwrap();
                assert_eq!(back.to_streams(3, 1).unwrap(), three);
                assert_eq!(back.to_streams(1, 0).unwrap(), one);
            }
        }
    }

    #[test]
    fn cells_repeat_to_a_deeper_state_of_the_same_layout() {
        for sections in [1, 2] {
            for v_trans in [false, true] {
                let mut s = state(sections, 1, 0, 3, v_trans);
                // Tell the cells apart: cell i's key and value bytes are i.
                let parsed = SeqState::parse(&s, sections, F16).unwrap();
                let block = parsed.sections[0].cells(&s).unwrap().unwrap();
                let rows = block.start + 4 + 3 * 12 + 16;
                for (k, cell) in [(rows + 12, 0u8), (rows + 16, 1), (rows + 20, 2)] {
                    s[k..k + 4].fill(cell);
                }
                let deep = SeqState::parse(&s, sections, F16)
                    .unwrap()
                    .repeated(7)
                    .unwrap();
                let parsed = SeqState::parse(&deep, sections, F16).unwrap();
                assert_eq!(parsed.streams(), 1);
                let block = parsed.sections[0].cells(&deep).unwrap().unwrap();
                let b = &deep[block];
                assert_eq!(&b[..4], &7u32.to_le_bytes());
                for p in 0..7u32 {
                    let at = 4 + 12 * p as usize;
                    assert_eq!(&b[at..at + 12], &w(&[p, 1, 5])[..]);
                }
                let rows = 4 + 7 * 12 + 16 + 12;
                let first: Vec<u8> = (0..7).map(|i| b[rows + 4 * i]).collect();
                assert_eq!(first, [0, 1, 2, 0, 1, 2, 0]);
            }
        }
        let empty = state(1, 1, 0, 0, false);
        assert!(SeqState::parse(&empty, 1, F16)
            .unwrap()
            .repeated(4)
            .is_err());
    }

    #[test]
    fn an_empty_sequence_converts_too() {
        let empty = state(2, 4, 0, 0, false);
        let one = SeqState::parse(&empty, 2, F16)
            .unwrap()
            .to_one_stream()
            .unwrap();
        assert_eq!(one, w(&[MAGIC, 5, 1, 0, 1, 0]));
    }

    #[test]
    fn every_byte_must_be_accounted_for() {
        let good = state(1, 1, 0, 2, false);
        for cut in 0..good.len() {
            assert!(
                SeqState::parse(&good[..cut], 1, F16).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(SeqState::parse(&long, 1, F16).is_err(), "a trailing byte");
        // Two sections read as one leave bytes over; one read as two runs short.
        assert!(SeqState::parse(&state(2, 1, 0, 2, false), 1, F16).is_err());
        assert!(SeqState::parse(&good, 2, F16).is_err());
    }

    #[test]
    fn foreign_layouts_are_refused() {
        let mut other_type = state(1, 1, 0, 2, false);
        // The first K type sits after header, stream count, cell count, 2 cells, 4 words.
        let at = 8 + 4 + 4 + 2 * 12 + 16;
        other_type[at..at + 4].copy_from_slice(&8u32.to_le_bytes()); // q8_0
        let e = SeqState::parse(&other_type, 1, F16).unwrap_err();
        assert!(e.what.contains("key type 8, expected f16"), "{e}");
        // The first layer's keys are q8_0 and the rest f16: a cache of one type refuses it.
        let q8_keys = Some(KvTypes {
            k: KvType::Q8_0,
            v: KvType::F16,
        });
        let e = SeqState::parse(&other_type, 1, q8_keys).unwrap_err();
        assert!(e.what.contains("key type 1, expected q8_0"), "{e}");
        assert!(SeqState::parse(&other_type, 1, None).is_ok());
        let mut magic = state(1, 1, 0, 2, false);
        magic[0] ^= 1;
        assert!(SeqState::parse(&magic, 1, F16).is_err());
        let mut two_seqs = state(1, 1, 0, 2, false);
        two_seqs[20..24].copy_from_slice(&2u32.to_le_bytes()); // first cell's n_seq_id
        assert!(SeqState::parse(&two_seqs, 1, F16).is_err());
    }

    #[test]
    fn cells_in_two_streams_are_not_one_sequence() {
        let mut s = w(&[MAGIC, 5, 2]);
        s.extend(block(1, false));
        s.extend(block(1, false));
        let parsed = SeqState::parse(&s, 1, F16).unwrap();
        assert!(parsed.to_one_stream().is_err());
        assert!(parsed.to_streams(2, 2).is_err());
    }
}
