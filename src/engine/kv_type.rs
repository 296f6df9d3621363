//! The element types of the KV cache: what `--cache-type-k` and `--cache-type-v` accept, and
//! the bytes each costs.

use llama_cpp_2::context::params::KvCacheType;

/// A KV cache element type, named as llama-server names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvType {
    /// 16-bit floats: llama.cpp's default.
    #[default]
    #[value(name = "f16")]
    F16,
    /// 8-bit blocks of 32 (8.5 bits an element).
    #[value(name = "q8_0")]
    Q8_0,
    /// 5-bit blocks of 32 with a minimum (6 bits an element).
    #[value(name = "q5_1")]
    Q5_1,
    /// 5-bit blocks of 32 (5.5 bits an element).
    #[value(name = "q5_0")]
    Q5_0,
    /// 4-bit blocks of 32 with a minimum (5 bits an element).
    #[value(name = "q4_1")]
    Q4_1,
    /// 4-bit blocks of 32 (4.5 bits an element).
    #[value(name = "q4_0")]
    Q4_0,
}

/// Elements in one block of a quantized type.
pub const QUANT_BLOCK: u32 = 32;

impl KvType {
    /// Its name, as the flags, the identity and the summary write it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q5_1 => "q5_1",
            Self::Q5_0 => "q5_0",
            Self::Q4_1 => "q4_1",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Whether it is stored in blocks of [`QUANT_BLOCK`] elements.
    pub fn is_quantized(self) -> bool {
        self != Self::F16
    }

    /// Bytes of `elements` elements; for a quantized type `elements` is a whole number of
    /// blocks (llama.cpp refuses a head width that is not).
    pub fn bytes(self, elements: u64) -> u64 {
        // ggml's block sizes: a 16-bit scale, a 16-bit minimum for the `_1` types, the
        // high bits of the 5-bit types, then the packed values.
        let block: u64 = match self {
            Self::F16 => return elements * 2,
            Self::Q8_0 => 2 + 32,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q4_0 => 2 + 16,
        };
        elements.div_ceil(u64::from(QUANT_BLOCK)) * block
    }

    /// ggml's type id, as a saved state names it.
    pub fn ggml(self) -> i32 {
        let id: llama_cpp_sys_2::ggml_type = self.llama().into();
        i32::try_from(id).unwrap_or(i32::MAX)
    }

    /// llama.cpp's type.
    pub fn llama(self) -> KvCacheType {
        match self {
            Self::F16 => KvCacheType::F16,
            Self::Q8_0 => KvCacheType::Q8_0,
            Self::Q5_1 => KvCacheType::Q5_1,
            Self::Q5_0 => KvCacheType::Q5_0,
            Self::Q4_1 => KvCacheType::Q4_1,
            Self::Q4_0 => KvCacheType::Q4_0,
        }
    }
}

/// The key and value types of a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvTypes {
    /// Keys.
    pub k: KvType,
    /// Values.
    pub v: KvType,
}

impl KvTypes {
    /// Both types as `k/v`, for messages.
    pub fn describe(self) -> String {
        format!("{}/{}", self.k.name(), self.v.name())
    }

    /// Whether either type is quantized.
    pub fn quantized(self) -> bool {
        self.k.is_quantized() || self.v.is_quantized()
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    #[test]
    fn block_bytes_match_ggml() {
        for &t in KvType::value_variants() {
            let id: llama_cpp_sys_2::ggml_type = t.llama().into();
            // SAFETY: plain lookups in ggml's type table, for types it defines.
            let (block, size) = unsafe {
                (
                    llama_cpp_sys_2::ggml_blck_size(id),
                    llama_cpp_sys_2::ggml_type_size(id),
                )
            };
            let block = u64::try_from(block).unwrap();
            assert_eq!(t.bytes(block * 4), size as u64 * 4, "{t:?}");
            assert_eq!(t.is_quantized(), block == u64::from(QUANT_BLOCK), "{t:?}");
        }
        // 34 bytes a block of 32: a little over half of f16's 64.
        assert_eq!(KvType::Q8_0.bytes(64 * 3), 34 * 6);
    }

    #[test]
    fn ggml_ids_are_those_a_saved_state_names() {
        // llama.cpp writes `ggml_type` as an i32 before each layer's rows.
        assert_eq!(KvType::F16.ggml(), 1);
        assert_eq!(KvType::Q8_0.ggml(), 8);
        assert_eq!(KvType::Q4_0.ggml(), 2);
    }

    #[test]
    fn only_f16_is_unquantized() {
        assert!(!KvType::F16.is_quantized());
        assert!(KvType::Q8_0.is_quantized());
        assert!(KvType::Q4_0.is_quantized());
    }
}
