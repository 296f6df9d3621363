//! What a run need not compute again: the shared-prefix KV cache (which prefixes are resident
//! in which sequence, and their states on disk) and earlier results by computation key.

pub mod prefix_cache;
pub mod prefix_store;
pub mod probe_cache;
pub mod result_reuse;
