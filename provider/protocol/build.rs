//! Generates the Rust bindings for the tfplugin and go-plugin protos at build time.
//!
//! protoc comes from the `protoc-bin-vendored` crate (and the well-known types from its include
//! directory), so a fresh machine needs nothing beyond cargo to build this crate.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    // SAFETY: the build script is single threaded at this point; prost-build reads PROTOC
    // from the environment to find the compiler.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let dir = PathBuf::from("proto");
    let files = [
        "tfplugin5.proto",
        "tfplugin6.proto",
        "grpc_controller.proto",
        "grpc_stdio.proto",
        "health.proto",
    ]
    .map(|f| dir.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    tonic_prost_build::configure()
        // The provider is the server; the client side is only generated for tests and benches
        // that talk to a running provider.
        .build_server(true)
        .build_client(true)
        // Every RPC the provider does not override answers UNIMPLEMENTED, which clients treat
        // as "feature not offered" (ephemeral resources, functions, state stores, actions...).
        .generate_default_stubs(true)
        .compile_protos(&files, &[dir, well_known])?;
    Ok(())
}
