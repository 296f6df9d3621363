//! The computation identity: everything that changes a result's bits, in one struct.
//!
//! Resume (the manifest), `--reuse`, `merge` and the prefix-state store all compare an
//! [`Identity`], field by field, through its serialised form: none keeps a list of names of its
//! own, so a field added here is checked everywhere at once. The fields fall in four sections,
//! and the section decides who may differ:
//!
//! - `model`: the model file's content;
//! - [`Machine`]: where the computation ran (our build, llama.cpp's, the backend, the devices,
//!   the CPU variant, the layers offloaded, the attention path and decode groups as applied);
//! - [`Settings`]: what the user asked for that changes bits (batch and context sizes, KV types,
//!   deterministic mode);
//! - [`OutputParams`]: the run-wide defaults of requests (`--max-tokens`, `--temperature`, ...).
//!
//! A prefix state depends on the first three; a result line on all four. `--resume-anywhere`
//! accepts a difference in the machine, and nothing else.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Where a computation ran: the code and the hardware that produced the bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Machine {
    /// infer-batch's version and git commit.
    pub build: String,
    /// The llama.cpp sources (a digest of them, and the crate that vendors them) and their
    /// CMake build type.
    pub llama_cpp: String,
    /// The backends compiled in: `cpu`, `vulkan`, `cuda`.
    pub backend: String,
    /// The CPU backend as it runs: the instruction-set features of the variant compiled in or
    /// loaded (a CPU's bits follow its kernels, not its brand).
    pub cpu_variant: String,
    /// Every GPU the backends found (`Vulkan0: llvmpipe (LLVM 15.0.6, 256 bits)`), with its
    /// driver where known: even with no layer offloaded, ggml may run large products there.
    pub devices: Vec<String>,
    /// Layers actually offloaded, after the plan fitted them to the GPU's memory.
    pub gpu_layers: u32,
    /// Flash attention as applied: `on`, `off`, or `auto` (llama.cpp's choice per device, only
    /// without deterministic mode).
    pub flash_attn: String,
    /// How generated tokens share decode calls: the start-up probe's decision in deterministic
    /// mode, or mixed batches without it.
    pub decode_groups: String,
}

/// The settings a user chose that change results' bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Settings {
    /// `--batch-size`: the prefill chunk size, which changes rounding.
    pub batch_size: u32,
    /// `--ctx-size`, as asked.
    pub ctx_size: Option<u32>,
    /// The KV cache's key type.
    pub cache_type_k: String,
    /// The KV cache's value type.
    pub cache_type_v: String,
    /// Whether outputs are independent of batch-mates.
    pub deterministic: bool,
    /// `--no-prefix-cache`: every prompt computed whole.
    pub no_prefix_cache: bool,
}

/// The settings that change what a request's line says when the request leaves them to the
/// run, by flag name. `--parallel` is not among them: in deterministic mode it changes nothing,
/// and without it batch-mates change the last bits anyway. The manifest records it per run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OutputParams {
    /// `--max-tokens`.
    pub max_tokens: u32,
    /// `--temperature`.
    pub temperature: f32,
    /// `--seed`.
    pub seed: u64,
    /// The chat template's identity.
    pub chat_template: String,
    /// `--ignore-unknown-fields`.
    pub ignore_unknown_fields: bool,
    /// `--pooling`, when given.
    pub pooling: Option<String>,
    /// `--no-normalize-embeddings`.
    pub no_normalize_embeddings: bool,
    /// `--reasoning-format`, when not `auto` (left out, an identity reads as before it
    /// existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_format: Option<String>,
    /// `--reasoning-budget`, when not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_budget: Option<String>,
    /// `--chat-template-kwargs`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<String>,
}

/// Everything that changes a result's bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Identity {
    /// SHA-256 of the model file's content, in hex.
    pub model: String,
    /// Where it ran.
    pub machine: Machine,
    /// What the user chose.
    pub settings: Settings,
    /// The requests' run-wide defaults.
    pub output: OutputParams,
}

/// The part of an identity a difference lies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The model file.
    Model,
    /// Where it ran.
    Machine,
    /// The settings chosen.
    Settings,
    /// The requests' defaults.
    Output,
}

/// One field that differs between two identities, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Where it lies.
    pub section: Section,
    /// What changed, for a person: `--batch-size was 256, now 512`.
    pub text: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Identity {
    /// As a manifest stores it: a JSON object of sections, compared key by key, so that an
    /// identity written by another build still reads and its differences are named.
    pub fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("a struct of plain fields serialises to an object"),
        }
    }

    /// The part a prefix state depends on (all but the requests' defaults), as canonical text:
    /// the prefix store keys and checks its files by it.
    pub fn state_key(&self) -> String {
        let mut map = self.to_map();
        map.remove("output");
        Value::Object(map).to_string()
    }
}

/// The fields that differ between the identity `now` and the stored `was` (both as
/// [`Identity::to_map`] writes them), each named. A field missing on one side reads as null, so
/// one added or dropped is a difference too.
pub fn differences(now: &Map<String, Value>, was: &Map<String, Value>) -> Vec<Difference> {
    let mut out = Vec::new();
    let now_flat = flatten(now);
    let was_flat = flatten(was);
    let dropped = was_flat.keys().filter(|k| !now_flat.contains_key(*k));
    let keys: Vec<&String> = now_flat.keys().chain(dropped).collect();
    for key in keys {
        let a = now_flat.get(key).copied().unwrap_or(&Value::Null);
        let b = was_flat.get(key).copied().unwrap_or(&Value::Null);
        if a == b {
            continue;
        }
        let (section, field) = key.split_once('.').unwrap_or((key.as_str(), ""));
        let (section, text) = match section {
            "model" => (
                Section::Model,
                format!("the model file changed (sha256 was {b}, now {a})"),
            ),
            "machine" => (
                Section::Machine,
                format!("the machine's {field} was {b}, now {a}"),
            ),
            "output" => (Section::Output, format!("--{field} was {b}, now {a}")),
            _ => (Section::Settings, format!("--{field} was {b}, now {a}")),
        };
        out.push(Difference { section, text });
    }
    out
}

/// `{"machine": {"backend": "cpu"}}` → `{"machine.backend": "cpu"}`, sections one level deep.
fn flatten(map: &Map<String, Value>) -> std::collections::BTreeMap<String, &Value> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in map {
        match v {
            Value::Object(inner) => {
                for (f, x) in inner {
                    out.insert(format!("{k}.{f}"), x);
                }
            }
            other => {
                out.insert(k.clone(), other);
            }
        }
    }
    out
}

/// Whether every difference lies where `--resume-anywhere` accepts one: in the machine.
pub fn only_machine(differences: &[Difference]) -> bool {
    differences.iter().all(|d| d.section == Section::Machine)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An identity for tests: a CPU machine, deterministic, default settings.
    pub fn identity() -> Identity {
        Identity {
            model: "aa".into(),
            machine: Machine {
                build: "infer-batch 0.1.0 (0123456789ab)".into(),
                llama_cpp: "sources 00".into(),
                backend: "cpu".into(),
                cpu_variant: "AVX2".into(),
                devices: Vec::new(),
                gpu_layers: 0,
                flash_attn: "off".into(),
                decode_groups: "any shape".into(),
            },
            settings: Settings {
                batch_size: 256,
                ctx_size: None,
                cache_type_k: "f16".into(),
                cache_type_v: "f16".into(),
                deterministic: true,
                no_prefix_cache: false,
            },
            output: OutputParams {
                max_tokens: 64,
                temperature: 0.0,
                seed: 0,
                chat_template: "gguf".into(),
                ignore_unknown_fields: false,
                pooling: None,
                no_normalize_embeddings: false,
                reasoning_format: None,
                reasoning_budget: None,
                chat_template_kwargs: None,
            },
        }
    }

    #[test]
    fn every_field_of_every_section_is_compared() {
        let a = identity();
        assert!(differences(&a.to_map(), &a.to_map()).is_empty());
        // Each field, changed alone, is named, in the section it belongs to: a field added to
        // a struct is compared without a second list to keep.
        let flat = flatten(&a.to_map()).into_keys().collect::<Vec<_>>();
        assert!(flat.len() >= 20, "{flat:?}");
        for key in flat {
            let mut b = a.to_map();
            let (section, field) = key.split_once('.').unwrap_or((key.as_str(), ""));
            let changed = Value::String("changed".into());
            if field.is_empty() {
                b.insert(section.into(), changed);
            } else {
                b[section][field] = changed;
            }
            let d = differences(&b, &a.to_map());
            assert_eq!(d.len(), 1, "{key}: {d:?}");
            let expected = match section {
                "model" => Section::Model,
                "machine" => Section::Machine,
                "output" => Section::Output,
                _ => Section::Settings,
            };
            assert_eq!(d[0].section, expected, "{key}");
            assert!(d[0].text.contains(field), "{key}: {}", d[0].text);
        }
    }

    #[test]
    fn differences_read_as_flags_and_machine_fields() {
        let a = identity();
        let mut b = a.clone();
        b.settings.batch_size = 512;
        b.machine.backend = "vulkan".into();
        b.machine.gpu_layers = 31;
        let d = differences(&b.to_map(), &a.to_map());
        let texts: Vec<&str> = d.iter().map(|d| d.text.as_str()).collect();
        assert!(
            texts.contains(&"--batch-size was 256, now 512"),
            "{texts:?}"
        );
        assert!(
            texts.contains(&"the machine's backend was \"cpu\", now \"vulkan\""),
            "{texts:?}"
        );
        assert!(!only_machine(&d));
        b.settings.batch_size = 256;
        let d = differences(&b.to_map(), &a.to_map());
        assert_eq!(d.len(), 2);
        assert!(only_machine(&d));
    }

    #[test]
    fn a_field_added_or_dropped_is_a_difference() {
        let a = identity().to_map();
        let mut b = a.clone();
        b["settings"]
            .as_object_mut()
            .unwrap()
            .insert("strict".into(), Value::Bool(true));
        assert_eq!(
            differences(&b, &a)[0].text,
            "--strict was null, now true".to_owned()
        );
        assert_eq!(
            differences(&a, &b)[0].text,
            "--strict was true, now null".to_owned()
        );
    }

    #[test]
    fn the_state_key_leaves_out_only_the_request_defaults() {
        let a = identity();
        let mut b = a.clone();
        b.output.max_tokens = 9;
        assert_eq!(a.state_key(), b.state_key());
        b.machine.decode_groups = "fixed".into();
        assert_ne!(a.state_key(), b.state_key());
        let mut c = a.clone();
        c.settings.cache_type_k = "q8_0".into();
        assert_ne!(a.state_key(), c.state_key());
        let mut m = a.clone();
        m.model = "bb".into();
        assert_ne!(a.state_key(), m.state_key());
    }
}
