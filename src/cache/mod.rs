//! The shared-prefix KV cache: which prefixes are resident in which sequence, and their
//! states on disk.

pub mod prefix_cache;
pub mod prefix_store;
