//! Compiles `proto/tidemark/**.proto` with protox (pure Rust, no system
//! protoc) and writes generated code and the descriptor set to `OUT_DIR` only.

use std::path::{Path, PathBuf};

fn proto_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    proto_files(&root.join("tidemark"), &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed=tidemark");

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tidemark_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Items decode straight into ordered maps: the connectors' items
        // are BTreeMaps, so a record's attributes are sorted once, without
        // SipHash-ing and rehashing every name on the replicator's per-record
        // path (a profile put hashing at about an eighth of it, #16.4).
        .btree_map(".tidemark.common.v1.MapValue.attributes")
        .btree_map(".tidemark.common.v1.Item.attributes")
        .btree_map(".tidemark.common.v1.Key.attributes")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
