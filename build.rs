//! In `native-cuda` builds, compiles the paged-attention kernel
//! (src/engine/native/paged_attention.cu) to PTX for `paged_attention.rs` to load; otherwise does
//! nothing. The PTX targets `CUDA_COMPUTE_CAP` (default 80, the first with native bf16; the
//! driver compiles it for newer GPUs at load), the same variable candle's kernels read.
fn main() {
    const KERNEL: &str = "src/engine/native/paged_attention.cu";
    println!("cargo:rerun-if-changed={KERNEL}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_NATIVE_CUDA").is_none() {
        return;
    }
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("paged_attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(KERNEL)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("{nvcc} (the CUDA compiler, for {KERNEL}) could not run: {e}; scripts/build-cuda.sh installs one")
        });
    assert!(status.success(), "{nvcc} failed on {KERNEL}");
}
