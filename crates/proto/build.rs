//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes a
//! descriptor set for gRPC server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

// Messages holding a pass phrase or a ticket token (kept in step with the
// redacting `Debug` impls in src/lib.rs).
include!("src/secret_messages.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "chipsite/keyvault/v1/keyvault.proto",
        "chipsite/ticket/v1/ticket.proto",
        "chipsite/admin/v1/admin.proto",
        "chipsite/events/v1/events.proto",
        "chipsite/peer/v1/peer.proto",
        "chipsite/tally/v1/tally.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("chipsite_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Messages that carry a secret get a redacting Debug (src/lib.rs).
        .skip_debug(SECRET_MESSAGES)
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
