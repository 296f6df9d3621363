//! Records what the binary is built from, for `--version` and the computation identity: our git
//! commit, the llama.cpp sources the crate vendors and the compilers that build them (a result
//! computed by other sources, another build type or another compiler is never reused) and the
//! backends compiled in. For the GPU builds, it also tells the binary where its shared
//! libraries are.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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
    println!(
        "cargo:rustc-env=INFER_BATCH_LLAMA_CPP_SOURCES={}",
        llama_sources(&version)
    );
    // The commit the sources come from, for `--version`: git's, or INFER_BATCH_GIT_COMMIT
    // where there is no history (the offline source bundle sets it in .cargo/config.toml).
    println!("cargo:rerun-if-env-changed=INFER_BATCH_GIT_COMMIT");
    let commit = git_commit()
        .or_else(|| std::env::var("INFER_BATCH_GIT_COMMIT").ok())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=INFER_BATCH_GIT_COMMIT={commit}");
    // The CMake build type changes floating-point code generation, so it is part of the build
    // identity too (`.cargo/config.toml` sets it).
    println!("cargo:rerun-if-env-changed=LLAMA_LIB_PROFILE");
    let profile = std::env::var("LLAMA_LIB_PROFILE").unwrap_or_else(|_| "default".to_owned());
    println!("cargo:rustc-env=INFER_BATCH_LLAMA_LIB_PROFILE={profile}");
    // So does the compiler (GCC and clang contract floating-point operations differently), and
    // the glibc it targets tells a portable build from a host one.
    println!(
        "cargo:rustc-env=INFER_BATCH_LLAMA_CPP_COMPILER={}",
        compilers()
    );
    // The GPU builds (`cuda`, `vulkan`) link llama.cpp as shared libraries, its backends
    // modules loaded at run time: look for them beside the binary, in its lib/ (where a shipped
    // copy keeps them), then where llama-cpp-sys-2 built them, so the binary starts without
    // LD_LIBRARY_PATH either way.
    println!("cargo::rustc-check-cfg=cfg(backend_modules)");
    let gpu: Vec<&str> = ["cuda", "vulkan"]
        .into_iter()
        .filter(|f| std::env::var_os(format!("CARGO_FEATURE_{}", f.to_uppercase())).is_some())
        .collect();
    println!("cargo:rustc-env=INFER_BATCH_GPU_BACKEND={}", gpu.join("+"));
    let backends = if gpu.is_empty() {
        "CPU backend".to_owned()
    } else {
        format!(
            "{} and CPU backends loaded at run time",
            gpu.join(", ").to_uppercase()
        )
    };
    println!("cargo:rustc-env=INFER_BATCH_BACKENDS={backends}");
    if !gpu.is_empty() {
        println!("cargo:rustc-cfg=backend_modules");
        let mut rpath = "$ORIGIN:$ORIGIN/lib".to_owned();
        if let Some(backends) = std::env::var_os("DEP_LLAMA_BACKENDS_DIR") {
            let built = std::path::Path::new(&backends).with_file_name("lib");
            rpath = format!("{rpath}:{}", built.display());
        }
        println!("cargo:rustc-link-arg=-Wl,-rpath,{rpath}");
    }
}

/// The llama.cpp sources that `llama-cpp-sys-2` `version` vendors: the llama-cpp-rs commit it
/// was published from and a SHA-256 over the sources themselves (file names and contents), so
/// that a patched copy reads as other sources.
fn llama_sources(version: &str) -> String {
    let name = format!("llama-cpp-sys-2-{version}");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    let registry = cargo_home.map(|h| h.join("registry").join("src"));
    let mut candidates: Vec<PathBuf> = registry
        .and_then(|r| std::fs::read_dir(r).ok())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join(&name))
        .collect();
    candidates.push(Path::new("vendor").join("llama-cpp-sys-2"));
    let Some(dir) = candidates
        .into_iter()
        .find(|d| d.join("llama.cpp").is_dir())
    else {
        return "sources unknown".to_owned();
    };
    let vcs = std::fs::read_to_string(dir.join(".cargo_vcs_info.json")).unwrap_or_default();
    let commit = vcs
        .split('"')
        .skip_while(|s| *s != "sha1")
        .nth(2)
        .map_or("unknown".to_owned(), |c| c.chars().take(12).collect());
    let root = dir.join("llama.cpp");
    let mut files = Vec::new();
    for sub in ["include", "src", "ggml", "common", "vendor"] {
        collect(&root.join(sub), &mut files);
    }
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap_or(f).to_string_lossy();
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        let bytes = std::fs::read(f).unwrap_or_default();
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    let digest: String = h.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("llama-cpp-rs {commit}, sources sha256 {digest}")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The C and C++ compilers that build llama.cpp (ggml's kernels are mostly C), found as the
/// cmake crate finds them: through cc's variables, else `cc` and `c++`.
fn compilers() -> String {
    let c = compiler("CC", "cc");
    let cxx = compiler("CXX", "c++");
    if c == cxx {
        c
    } else {
        format!("C {c}; C++ {cxx}")
    }
}

/// One compiler's `--version` line, and its target where it names one (zig's clang names the
/// glibc it builds for).
fn compiler(var: &str, default: &str) -> String {
    let target = std::env::var("TARGET").unwrap_or_default();
    // cc reads HOST_CC where the target is the host, TARGET_CC otherwise.
    let kind = if std::env::var("HOST").ok().as_deref() == Some(target.as_str()) {
        "HOST"
    } else {
        "TARGET"
    };
    let vars = [
        format!("{var}_{target}"),
        format!("{var}_{}", target.replace('-', "_")),
        format!("{kind}_{var}"),
        var.to_owned(),
    ];
    for v in &vars {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let command = vars
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|c| !c.trim().is_empty()))
        .unwrap_or_else(|| default.to_owned());
    let mut words = command.split_whitespace();
    let Some(program) = words.next() else {
        return "unknown".to_owned();
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    let Some(out) = std::process::Command::new(program)
        .args(words)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
    else {
        return format!("{name} (version unknown)");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    // GCC's first line starts with the name it was called by (`cc (Debian 12.2.0-14) 12.2.0`):
    // named GCC instead, `cc` and `c++` read as the one GCC they are.
    let first = lines.next().unwrap_or("unknown").trim();
    let first = match first.strip_prefix(name).map(str::trim_start) {
        Some(rest) if rest.starts_with('(') => format!("GCC {rest}"),
        _ => first.to_owned(),
    };
    match lines.find_map(|l| l.strip_prefix("Target:")) {
        Some(t) => format!("{first}, target {}", t.trim()),
        None => first,
    }
}

/// This checkout's commit (12 hex digits), `None` outside a git checkout of this project (never
/// the commit of a repository the sources were unpacked into). Asks cargo to rerun when HEAD
/// moves.
fn git_commit() -> Option<String> {
    let dir = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let top = std::path::PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let head = git(&["rev-parse", "--short=12", "HEAD"])?;
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            println!("cargo:rerun-if-changed={}", dir.join(path).display());
        }
    }
    Some(head)
}
