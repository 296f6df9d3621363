//! The GPU builds' (`cuda`, `vulkan`) llama.cpp backends are modules loaded at run time, so one
//! binary serves machines with and without a GPU. This picks them: the CPU variant for this
//! processor (as llama.cpp would, by each variant's own score) and every other backend found
//! (CUDA, Vulkan).
//!
//! Unlike llama.cpp's own loader it never loads the AMX variant: on this project's VMs the
//! processor advertises AMX and the OS enables its state, yet the first tile instruction
//! traps (SIGILL), which would kill the run. The AVX-512 variants serve such processors.

// Only the GPU builds load modules; the choosing is plain logic, tested in every build.
#![cfg_attr(not(backend_modules), allow(dead_code))]

use std::ffi::c_int;
#[cfg(backend_modules)]
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// CPU variants never loaded (see the module's comment).
const SKIPPED_CPU_VARIANTS: &[&str] = &["libggml-cpu-sapphirerapids.so"];

/// Why each GPU module found gives no device, for the run's one "no GPU" line.
static NOT_LOADED: OnceLock<Vec<String>> = OnceLock::new();

/// The GPU modules that were found but did not load, each with the loader's reason (such as
/// `libvulkan.so.1: cannot open shared object file`), or that loaded and found no device;
/// empty before `load` runs and on a CPU build.
pub fn not_loaded() -> &'static [String] {
    NOT_LOADED.get().map_or(&[], Vec::as_slice)
}

/// Loads the backends from the first place that has CPU variants: beside the executable, its
/// `lib/`, `../lib/infer-batch/` (the release archive's layout), or where the build put them.
/// An unpacked archive (its `../lib/infer-batch/` exists) never falls through to the build's
/// place, which another machine's build may hold: a module missing from it is named instead.
/// Never the current directory: a library planted there would run as this process.
#[cfg(backend_modules)]
pub fn load() -> Result<(), String> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let archive = exe_dir
        .as_ref()
        .is_some_and(|dir| dir.join("../lib/infer-batch").is_dir());
    let places: Vec<PathBuf> = exe_dir
        .iter()
        .flat_map(|dir| [dir.clone(), dir.join("lib"), dir.join("../lib/infer-batch")])
        .chain(
            llama_cpp_sys_2::BACKENDS_DIR
                .filter(|_| !archive)
                .map(PathBuf::from),
        )
        .collect();
    let found = places
        .iter()
        .map(|dir| modules(dir))
        .find(|m| !m.is_empty());
    let Some(modules) = found else {
        return Err(format!(
            "no llama.cpp CPU backend (libggml-cpu-*.so) in {}: ship the modules beside the binary",
            places
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let (cpu, others): (Vec<PathBuf>, Vec<PathBuf>) = modules
        .into_iter()
        .partition(|p| file_name(p).starts_with("libggml-cpu-"));
    let best = best_cpu_variant(&cpu, score)
        .ok_or("no llama.cpp CPU backend variant runs on this processor")?;
    register(best)?;
    tracing::info!(
        "CPU backend: variant {} ({})",
        file_name(best)
            .trim_start_matches("libggml-cpu-")
            .trim_end_matches(".so"),
        best.display()
    );
    // A module that cannot load (no CUDA runtime or Vulkan loader here), or loads and finds
    // no device (no driver), is left out; the run says why once, where it falls back to the CPU.
    let failed = others
        .iter()
        .filter_map(|m| register(m).map_or_else(Some, |reg| no_device(m, reg)))
        .collect();
    let _ = NOT_LOADED.set(failed);
    Ok(())
}

/// Why a module that registered gives no device, or `None` where it gives one: the CUDA
/// module loads wherever its runtime libraries are, and finds no device without the driver.
#[cfg(backend_modules)]
fn no_device(path: &Path, reg: llama_cpp_sys_2::ggml_backend_reg_t) -> Option<String> {
    // SAFETY: `reg` is the registry entry ggml just returned for this module; it lives as
    // long as the process, and its name is a NUL-terminated string it owns.
    let (devices, backend) = unsafe {
        (
            llama_cpp_sys_2::ggml_backend_reg_dev_count(reg),
            super::device::c_text(llama_cpp_sys_2::ggml_backend_reg_name(reg)).unwrap_or_default(),
        )
    };
    let name = file_name(path);
    (devices == 0).then(|| match backend.as_str() {
        "CUDA" => format!(
            "{name} loaded but found no device (no NVIDIA GPU, or no driver for CUDA 13: \
             release 580 or newer; -v shows CUDA's own error)"
        ),
        "Vulkan" => format!(
            "{name} loaded but found no GPU (a CPU-type device such as lavapipe is used only \
             when GGML_VK_VISIBLE_DEVICES names it)"
        ),
        _ => format!("{name} loaded but found no device"),
    })
}

/// The CPU variant with the best score above 0, the skipped ones left out.
fn best_cpu_variant(cpu: &[PathBuf], score: impl Fn(&Path) -> Option<c_int>) -> Option<&PathBuf> {
    cpu.iter()
        .filter(|p| !SKIPPED_CPU_VARIANTS.contains(&file_name(p).as_str()))
        .filter_map(|p| score(p).filter(|&s| s > 0).map(|s| (s, p)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// The backend modules in `dir`: `libggml-NAME.so`, not ggml's own libraries.
fn modules(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = file_name(p);
            name.starts_with("libggml-")
                && name.ends_with(".so")
                && name != "libggml-base.so"
                && p.is_file()
        })
        .collect();
    found.sort();
    if found
        .iter()
        .any(|p| file_name(p).starts_with("libggml-cpu-"))
    {
        found
    } else {
        Vec::new()
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A CPU variant's own verdict on this processor: 0 where it cannot run, higher for a better
/// fit; `None` where it does not load.
#[cfg(backend_modules)]
fn score(path: &Path) -> Option<c_int> {
    // SAFETY: a ggml backend module; loading it runs only its registration constructors, and
    // `ggml_backend_score` only reads CPUID.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let score = lib
            .get::<unsafe extern "C" fn() -> c_int>(b"ggml_backend_score\0")
            .ok()?;
        Some(score())
    }
}

/// Registers one backend module with llama.cpp, returning its registry entry.
#[cfg(backend_modules)]
fn register(path: &Path) -> Result<llama_cpp_sys_2::ggml_backend_reg_t, String> {
    let c_path = CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", path.display()))?;
    // SAFETY: a plain call into ggml's registry with a valid C string.
    let reg = unsafe { llama_cpp_sys_2::ggml_backend_load(c_path.as_ptr()) };
    if reg.is_null() {
        // ggml logs the loader's reason only under -v: ask the loader again for it.
        // SAFETY: as in `score`; the module's constructors already ran once in this process.
        let why = unsafe { libloading::Library::new(path) }
            .err()
            .map_or_else(|| "it did not register".to_owned(), |e| e.to_string());
        Err(format!("{} did not load ({why})", file_name(path)))
    } else {
        Ok(reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_the_backends_in_a_folder_with_cpu_variants() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libggml-base.so",
            "libggml-base.so.0",
            "libggml.so.0",
            "libllama.so",
            "libggml-cpu-x64.so",
            "libggml-cpu-zen4.so",
            "libggml-cuda.so",
            "notes.txt",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names: Vec<String> = modules(dir.path()).iter().map(|p| file_name(p)).collect();
        assert_eq!(
            names,
            [
                "libggml-cpu-x64.so",
                "libggml-cpu-zen4.so",
                "libggml-cuda.so"
            ]
        );
        // Without a CPU variant the folder does not count: the CPU backend is needed.
        std::fs::remove_file(dir.path().join("libggml-cpu-x64.so")).unwrap();
        std::fs::remove_file(dir.path().join("libggml-cpu-zen4.so")).unwrap();
        assert!(modules(dir.path()).is_empty());
        assert!(modules(&dir.path().join("absent")).is_empty());
    }

    #[test]
    fn the_best_scoring_variant_wins_but_never_the_amx_one() {
        let cpu: Vec<PathBuf> = ["x64", "haswell", "zen4", "sapphirerapids", "icelake"]
            .iter()
            .map(|v| PathBuf::from(format!("/b/libggml-cpu-{v}.so")))
            .collect();
        let score = |p: &Path| {
            Some(match file_name(p).as_str() {
                "libggml-cpu-x64.so" => 1,
                "libggml-cpu-haswell.so" => 20,
                "libggml-cpu-zen4.so" => 60,
                "libggml-cpu-sapphirerapids.so" => 90,
                _ => 0, // icelake: cannot run here
            })
        };
        let best = best_cpu_variant(&cpu, score).unwrap();
        assert_eq!(file_name(best), "libggml-cpu-zen4.so");
        // Variants that cannot run (score 0) or do not load are never picked.
        assert!(best_cpu_variant(&cpu[4..], score).is_none());
        assert!(best_cpu_variant(&cpu, |_| None).is_none());
    }
}
