//! Sizes the KV cache from what the input needs: the resident prefixes once, plus one
//! per-request budget for every slot.

pub mod memory;

use crate::formats::summary::PlanRecord;

/// What a scan of the input found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demand {
    /// Input lines that get an output line (blank lines excluded).
    pub lines: u64,
    /// Valid requests.
    pub requests: u64,
    /// Distinct shared prefixes.
    pub distinct_prefixes: usize,
    /// Token lengths of the largest distinct prefixes, longest first: as many as can be
    /// resident at once, which is all that sizing needs.
    pub largest_prefixes: Vec<usize>,
    /// The largest KV need of one request beyond its shared prefix: own prompt tokens plus
    /// `max_tokens`.
    pub max_need: usize,
}

impl Demand {
    /// Counts a new distinct prefix of `len` tokens, keeping the `keep` largest lengths.
    pub fn add_prefix(&mut self, len: usize, keep: usize) {
        self.distinct_prefixes += 1;
        let at = self.largest_prefixes.partition_point(|&l| l >= len);
        if at < keep {
            self.largest_prefixes.insert(at, len);
            self.largest_prefixes.truncate(keep);
        }
    }
}

/// KV cells llama.cpp allocates in steps of this size.
pub const CTX_STEP: usize = 256;

/// How sequences share the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// One cache: a prefix sits in memory once, whatever the number of slots.
    Unified,
    /// A stream per sequence (exact mode), plus one stream that pads lone decode rows; every
    /// stream holds the largest prefix plus one request's need.
    Streams,
}

impl KvLayout {
    /// `unified` or `streams`, as files report it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unified => "unified",
            Self::Streams => "streams",
        }
    }
}

/// The shape of the context a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// KV cache cells.
    pub n_ctx: u32,
    /// Most cells one request may use beyond its shared prefix.
    pub slot_budget: usize,
    /// Prefix sequences kept resident.
    pub resident_prefixes: usize,
    /// Sequences in the context (slots plus prefixes, plus the pad stream in exact mode).
    pub n_seq_max: u32,
    /// How the sequences share the cache.
    pub layout: KvLayout,
}

impl Plan {
    /// As the summary reports it.
    pub fn record(&self) -> PlanRecord {
        PlanRecord {
            n_ctx: self.n_ctx,
            slot_budget: self.slot_budget,
            resident_prefixes: self.resident_prefixes,
            n_seq_max: self.n_seq_max,
            kv_layout: self.layout.name().to_owned(),
        }
    }
}

/// A context size that cannot hold the prefixes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--ctx-size {ctx} leaves no room for requests: the shared prefixes alone take {prefixes} \
     tokens; raise --ctx-size or lower --max-prefixes"
)]
pub struct PlanError {
    /// The override.
    pub ctx: usize,
    /// Cells the resident prefixes take.
    pub prefixes: usize,
}

/// Plans the context for `parallel` slots.
///
/// # Errors
/// [`PlanError`] when `ctx_override` cannot hold the resident prefixes plus one token per slot.
pub fn plan(
    demand: &Demand,
    parallel: usize,
    max_prefixes: usize,
    share: bool,
    ctx_override: Option<usize>,
    layout: KvLayout,
) -> Result<Plan, PlanError> {
    let resident_prefixes = if share {
        demand.distinct_prefixes.min(max_prefixes)
    } else {
        0
    };
    let lens = &demand.largest_prefixes;
    if layout == KvLayout::Streams {
        return plan_streams(demand, parallel, resident_prefixes, lens, ctx_override);
    }
    let prefix_area: usize = lens.iter().take(resident_prefixes).sum();
    let (n_ctx, slot_budget) = match ctx_override {
        Some(ctx) => {
            if ctx < prefix_area + parallel {
                return Err(PlanError {
                    ctx,
                    prefixes: prefix_area,
                });
            }
            (ctx, (ctx - prefix_area) / parallel)
        }
        None => {
            let want = prefix_area + parallel * demand.max_need.max(1);
            (want.div_ceil(CTX_STEP) * CTX_STEP, demand.max_need.max(1))
        }
    };
    Ok(Plan {
        n_ctx: u32::try_from(n_ctx).unwrap_or(u32::MAX),
        slot_budget,
        resident_prefixes,
        n_seq_max: u32::try_from(parallel + resident_prefixes).unwrap_or(u32::MAX),
        layout,
    })
}

/// Streams: each slot's stream gets a copy of the largest prefix plus one request's need.
fn plan_streams(
    demand: &Demand,
    parallel: usize,
    resident_prefixes: usize,
    lens_desc: &[usize],
    ctx_override: Option<usize>,
) -> Result<Plan, PlanError> {
    let n_seq = parallel + resident_prefixes + 1;
    let largest_prefix = if resident_prefixes > 0 {
        lens_desc.first().copied().unwrap_or(0)
    } else {
        0
    };
    let (stream, slot_budget) = match ctx_override {
        Some(ctx) => {
            let stream = ctx / n_seq;
            if stream <= largest_prefix {
                return Err(PlanError {
                    ctx,
                    prefixes: largest_prefix * n_seq,
                });
            }
            (stream, stream - largest_prefix)
        }
        None => {
            let need = demand.max_need.max(1);
            ((largest_prefix + need).div_ceil(CTX_STEP) * CTX_STEP, need)
        }
    };
    Ok(Plan {
        n_ctx: u32::try_from(stream * n_seq).unwrap_or(u32::MAX),
        slot_budget,
        resident_prefixes,
        n_seq_max: u32::try_from(n_seq).unwrap_or(u32::MAX),
        layout: KvLayout::Streams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(prefixes: &[usize], max_need: usize) -> Demand {
        let mut d = Demand {
            lines: 10,
            requests: 10,
            max_need,
            ..Demand::default()
        };
        for &len in prefixes {
            d.add_prefix(len, 4);
        }
        d
    }

    #[test]
    fn the_largest_prefixes_are_kept_whatever_their_order() {
        let mut d = Demand::default();
        for len in [5, 900, 7, 300, 1000, 2, 301] {
            d.add_prefix(len, 3);
        }
        assert_eq!(d.distinct_prefixes, 7);
        assert_eq!(d.largest_prefixes, vec![1000, 900, 301]);
        let p = plan(&d, 1, 2, true, None, KvLayout::Unified).unwrap();
        assert_eq!(p.resident_prefixes, 2);
        assert_eq!(p.n_ctx, 2048); // 1000 + 900 + own need 0 → at least 1
    }

    #[test]
    fn prefix_counted_once_and_slots_each_get_the_need() {
        let p = plan(&demand(&[1000], 300), 4, 4, true, None, KvLayout::Unified).unwrap();
        assert_eq!(p.n_ctx, 2304); // 1000 + 4 × 300 = 2200, rounded up to 256
        assert_eq!(p.slot_budget, 300);
        assert_eq!((p.resident_prefixes, p.n_seq_max), (1, 5));
    }

    #[test]
    fn only_the_largest_resident_prefixes_are_reserved() {
        let p = plan(
            &demand(&[10, 500, 300, 200], 100),
            1,
            2,
            true,
            None,
            KvLayout::Unified,
        )
        .unwrap();
        assert_eq!(p.resident_prefixes, 2);
        assert_eq!(p.n_ctx, 1024); // 500 + 300 + 100 = 900
    }

    #[test]
    fn naive_mode_reserves_no_prefix() {
        let p = plan(&demand(&[1000], 1300), 2, 4, false, None, KvLayout::Unified).unwrap();
        assert_eq!((p.resident_prefixes, p.n_seq_max), (0, 2));
        assert_eq!(p.n_ctx, 2816);
    }

    #[test]
    fn override_divides_what_is_left() {
        let p = plan(
            &demand(&[1000], 300),
            4,
            4,
            true,
            Some(3000),
            KvLayout::Unified,
        )
        .unwrap();
        assert_eq!((p.n_ctx, p.slot_budget), (3000, 500));
        let e = plan(
            &demand(&[1000], 300),
            4,
            4,
            true,
            Some(1002),
            KvLayout::Unified,
        )
        .unwrap_err();
        assert_eq!(e.prefixes, 1000);
    }

    #[test]
    fn streams_give_every_sequence_the_prefix_plus_a_need() {
        let p = plan(
            &demand(&[1000, 10], 300),
            4,
            4,
            true,
            None,
            KvLayout::Streams,
        )
        .unwrap();
        // 4 slots + 2 prefixes + 1 pad, each 1300 cells rounded up to 1536.
        assert_eq!((p.n_seq_max, p.n_ctx, p.slot_budget), (7, 7 * 1536, 300));
        let naive = plan(&demand(&[1000], 1300), 1, 4, false, None, KvLayout::Streams).unwrap();
        assert_eq!((naive.n_seq_max, naive.n_ctx), (2, 2 * 1536));
    }

    #[test]
    fn empty_input_still_gets_a_context() {
        let p = plan(&Demand::default(), 4, 4, true, None, KvLayout::Unified).unwrap();
        assert_eq!(p.n_ctx, 256);
        assert_eq!(p.resident_prefixes, 0);
    }
}
