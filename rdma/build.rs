//! Compiles the C shim over libfabric's static-inline calls against
//! libfabric's headers (Debian/Ubuntu: `apt-get install libfabric-dev`).
//! The library itself is loaded at run time, on first use (see shim.c).

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .warnings(true)
        .compile("dmfabric_shim");
    println!("cargo:rustc-link-lib=dl");
}
