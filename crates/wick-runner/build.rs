//! With the `cuda` feature: Wick's own CUDA kernels (`kernels/*.cu`) compiled to PTX by
//! `nvcc`, embedded in the library and loaded by the driver at first use (for
//! `compute_$CUDA_COMPUTE_CAP`, 90 unless set: H100 and H200).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["paged_attention", "sampling"] {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = std::process::Command::new(&nvcc)
            // No contraction of a multiply and an add into an fma unless the source writes
            // fmaf: the CPU reference (src/paged) does the same arithmetic.
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo", "--fmad=false"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} for {src} (the cuda feature needs the CUDA toolchain: `make cuda`): {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
