//! What the engine computes with, for the computation identity and `--version`: llama.cpp's
//! sources and build type, the backends compiled in, the CPU variant that runs and the GPUs.

use llama_cpp_sys_2 as sys;

use super::{backend, c_text, devices};

/// The llama.cpp this binary links: the crate that vendors it, the sources, the build type and
/// the compiler.
pub fn llama_cpp() -> String {
    format!(
        "llama-cpp-sys-2 {} ({}), {}, {}",
        env!("INFER_BATCH_LLAMA_CPP_SYS_VERSION"),
        env!("INFER_BATCH_LLAMA_CPP_SOURCES"),
        env!("INFER_BATCH_LLAMA_LIB_PROFILE"),
        env!("INFER_BATCH_LLAMA_CPP_COMPILER")
    )
}

/// The backends compiled in: `cpu`, or the GPU backends (`vulkan`, `cuda`) beside it.
pub fn backends() -> String {
    let gpu = env!("INFER_BATCH_GPU_BACKEND");
    if gpu.is_empty() {
        "cpu".to_owned()
    } else {
        format!("cpu+{gpu}")
    }
}

/// What the engine found once started: the CPU variant and the GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// The running CPU backend's features (`AVX2=1 FMA=1 ...`): the instruction sets its
    /// kernels use, compiled in or picked at load time.
    pub cpu_variant: String,
    /// Each GPU, `name: description`, with the driver's version where NVML knows it.
    pub devices: Vec<String>,
}

/// Starts the backend if no model did yet, and reports what it runs on.
pub fn hardware() -> Hardware {
    if backend(false).is_err() {
        return Hardware {
            cpu_variant: "unknown".to_owned(),
            devices: Vec::new(),
        };
    }
    let gpus: Vec<_> = devices().into_iter().filter(|d| d.gpu).collect();
    let driver = gpus
        .iter()
        .any(|d| d.name.starts_with("CUDA"))
        .then(nvidia_driver)
        .flatten();
    let devices = gpus
        .iter()
        .map(|d| match (&driver, d.name.starts_with("CUDA")) {
            (Some(v), true) => format!("{}: {} (driver {v})", d.name, d.description),
            _ => format!("{}: {}", d.name, d.description),
        })
        .collect();
    Hardware {
        cpu_variant: cpu_features(),
        devices,
    }
}

/// The NVIDIA driver's version, where NVML loads.
fn nvidia_driver() -> Option<String> {
    nvml_wrapper::Nvml::init()
        .ok()
        .and_then(|n| n.sys_driver_version().ok())
}

/// The CPU backend's own feature list, through ggml's `ggml_backend_get_features`.
fn cpu_features() -> String {
    // SAFETY: registry lookups by name; the features array that ggml returns is static and
    // ends with a null name.
    unsafe {
        let reg = sys::ggml_backend_reg_by_name(c"CPU".as_ptr());
        if reg.is_null() {
            return "no CPU backend".to_owned();
        }
        let proc =
            sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_get_features".as_ptr());
        if proc.is_null() {
            return "unknown".to_owned();
        }
        let get: sys::ggml_backend_get_features_t = std::mem::transmute(proc);
        let Some(get) = get else {
            return "unknown".to_owned();
        };
        let mut feature = get(reg);
        let mut out = Vec::new();
        while !feature.is_null() && !(*feature).name.is_null() {
            let name = c_text((*feature).name).unwrap_or_default();
            let value = c_text((*feature).value).unwrap_or_default();
            out.push(format!("{name}={value}"));
            feature = feature.add(1);
        }
        out.join(" ")
    }
}
