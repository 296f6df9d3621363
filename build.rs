//! Records which llama.cpp build the binary links, for the prefix-state files' identity: a state
//! written by another llama.cpp version or build type is rebuilt, never loaded. For the `cuda`
//! build, it also tells the binary where its shared libraries are.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=INFER_BATCH_LLAMA_CPP_SYS_VERSION={version}");
    // The CMake build type changes floating-point code generation, so it is part of the build
    // identity too (`.cargo/config.toml` sets it).
    println!("cargo:rerun-if-env-changed=LLAMA_LIB_PROFILE");
    let profile = std::env::var("LLAMA_LIB_PROFILE").unwrap_or_else(|_| "default".to_owned());
    println!("cargo:rustc-env=INFER_BATCH_LLAMA_LIB_PROFILE={profile}");
    // The `cuda` build links llama.cpp as shared libraries (its backends load at run time):
    // look for them beside the binary and in its lib/, so it starts without LD_LIBRARY_PATH.
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:$ORIGIN/lib");
    }
}
