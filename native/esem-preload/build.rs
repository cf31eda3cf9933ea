//! Compiles the C part of the preload library: the three waits that are cancellation
//! points, so a `pthread_cancel` unwinds only C frames (see src/shim.c).
fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .flag("-fexceptions")
        .warnings(true)
        .compile("esemshim");
}
