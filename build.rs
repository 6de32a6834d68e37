//! Link libtorch so that the binary runs with no `LD_LIBRARY_PATH` and, on a
//! libtorch with CUDA, really gets CUDA.
//!
//! torch-sys (its `links = "tch"`) tells us its library folder through
//! `DEP_TCH_LIBTORCH_LIB`. We embed an rpath to it, and when `libtorch_cuda.so`
//! is there we link `torch_cuda` and `torch` between `--no-as-needed` and
//! `--as-needed`: nothing in our code references a CUDA symbol, so otherwise
//! the linker drops the library and `tch::Cuda::is_available()` says false on
//! a GPU node. We also record the libtorch version for `sfron doctor`, and
//! compile global BatchNorm's autograd function and the fused AdamW call
//! against libtorch's headers.

use std::fs;
use std::path::Path;

fn main() {
    #[cfg(feature = "mpi")]
    build_in_place_shim();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    // The C++ shims (global BatchNorm, fused AdamW) need
    // libtorch's headers: no build without them.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB): \
         run launch/setup, or set LIBTORCH to a libtorch 2.11 folder",
    );
    let lib_dir = Path::new(&lib);
    build_libtorch_shims(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let has_cuda = lib_dir.join("libtorch_cuda.so").exists();
    if has_cuda {
        println!("cargo:rustc-link-search=native={lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    println!("cargo:rustc-env=SFRON_LIBTORCH_LIB={lib}");
    println!(
        "cargo:rustc-env=SFRON_LIBTORCH_VERSION={}",
        libtorch_version(lib_dir)
    );
    println!("cargo:rustc-env=SFRON_LIBTORCH_CUDA={has_cuda}");
}

/// Compiles `src/comm/in_place.c` (MPI_IN_PLACE for the raw bindings)
/// against the MPI headers that mpi-sys found.
#[cfg(feature = "mpi")]
fn build_in_place_shim() {
    println!("cargo:rerun-if-changed=src/comm/in_place.c");
    let mpi = build_probe_mpi::probe().unwrap_or_else(|errs| {
        panic!("no MPI installation found for src/comm/in_place.c (run launch/setup): {errs:?}")
    });
    let mut build = cc::Build::new();
    build.file("src/comm/in_place.c");
    for dir in &mpi.include_paths {
        build.include(dir);
    }
    build.compile("sfron_mpi_in_place");
}

/// Compiles global BatchNorm's autograd function (src/model/sync_batch_norm.cpp)
/// and the fused AdamW call (src/engine/fused_adamw.cpp) against the headers
/// of the libtorch in `lib_dir` (`lib/../include`), with
/// the C++ ABI that torch-sys builds libtch with.
fn build_libtorch_shims(lib_dir: &Path) {
    println!("cargo:rerun-if-changed=src/model/sync_batch_norm.cpp");
    println!("cargo:rerun-if-changed=src/engine/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let include = lib_dir.join("../include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/model/sync_batch_norm.cpp")
        .file("src/engine/fused_adamw.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("sfron_libtorch_shims");
}

/// The version string of the libtorch in `lib_dir`: `build-version` of a
/// libtorch archive (`libtorch/lib/..`), or `version.py` of a PyTorch wheel
/// (`torch/lib/..`).
fn libtorch_version(lib_dir: &Path) -> String {
    let Some(root) = lib_dir.parent() else {
        return "unknown".into();
    };
    if let Ok(text) = fs::read_to_string(root.join("build-version")) {
        return text.trim().to_string();
    }
    if let Ok(text) = fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let value = rest
                    .trim_start_matches([' ', '=', ':', 's', 't', 'r'])
                    .trim();
                return value.trim_matches(['\'', '"']).to_string();
            }
        }
    }
    "unknown".into()
}
