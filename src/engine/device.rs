//! The devices of llama.cpp's backends: starting the backends once per process, what they
//! found (ggml's backend-neutral device query) and the build this binary links.

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

#[cfg(backend_modules)]
use super::backends;
use super::EngineError;

/// A NUL-terminated string of ggml's, or nothing for a null pointer.
pub(super) fn c_text(p: *const std::ffi::c_char) -> Option<String> {
    // SAFETY: ggml returns NUL-terminated strings that live as long as the device.
    (!p.is_null()).then(|| {
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    })
}

/// One device of the started backends, as ggml's backend-neutral device query reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// ggml's name for it: `CPU`, `CUDA0`, `Vulkan0`.
    pub name: String,
    /// What it is: `NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub description: String,
    /// An accelerator that layers can be offloaded to (a GPU or integrated GPU).
    pub gpu: bool,
    /// Its PCI bus id (`0000:c1:00.0`), where the backend knows it.
    pub pci_bus_id: Option<String>,
    /// Memory free now, in bytes, as the backend reports it.
    pub free: u64,
    /// Memory in all, in bytes.
    pub total: u64,
}

/// Every device of the started backends, in ggml's order (the order offloaded layers take).
pub fn devices() -> Vec<Device> {
    use llama_cpp_sys_2 as sys;
    // SAFETY: plain queries of ggml's device registry, indices below its count; the props
    // struct is plain data that ggml fills.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let dev = sys::ggml_backend_dev_get(i);
                let mut props: sys::ggml_backend_dev_props = std::mem::zeroed();
                sys::ggml_backend_dev_get_props(dev, &raw mut props);
                Device {
                    name: c_text(props.name).unwrap_or_default(),
                    description: c_text(props.description).unwrap_or_default(),
                    gpu: matches!(
                        props.type_,
                        sys::GGML_BACKEND_DEVICE_TYPE_GPU | sys::GGML_BACKEND_DEVICE_TYPE_IGPU
                    ),
                    pci_bus_id: c_text(props.device_id),
                    free: props.memory_free as u64,
                    total: props.memory_total as u64,
                }
            })
            .collect()
    }
}

/// The GPUs that layers can be offloaded to, with their memory as each backend reports it
/// (CUDA's and Vulkan's own queries alike). Starts the backends if no model did yet.
pub fn gpu_devices() -> Vec<Device> {
    if backend(false).is_err() {
        return Vec::new();
    }
    devices().into_iter().filter(|d| d.gpu).collect()
}

/// The llama.cpp backend initialises once per process; every model shares it.
pub(super) fn backend(verbose: bool) -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp is chatty on stderr; it speaks only under -v.
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(verbose),
            );
            load_backend_modules()?;
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// With backends built as modules (the GPU builds), loads them.
#[cfg(backend_modules)]
fn load_backend_modules() -> Result<(), String> {
    backends::load()
}

#[cfg(not(backend_modules))]
#[allow(clippy::unnecessary_wraps)] // the GPU builds' can fail
fn load_backend_modules() -> Result<(), String> {
    Ok(())
}

/// Whether a GPU backend with at least one device is loaded, after the backend started.
pub fn gpu_available() -> bool {
    // SAFETY: a plain query of llama.cpp's backend registry.
    unsafe { llama_cpp_sys_2::llama_supports_gpu_offload() }
}
