//! Compiles the C shim over libfabric's static-inline calls and links
//! libfabric (Debian/Ubuntu: `apt-get install libfabric-dev`).

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .warnings(true)
        .compile("dmfabric_shim");
    println!("cargo:rustc-link-lib=fabric");
}
