//! Generates the ProductService code (server and client) and its descriptor set, for
//! reflection, from `proto/product.proto`. Needs `protoc` (Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("product_descriptor.bin"))
        .compile_protos(&["proto/product.proto"], &["proto"])?;
    Ok(())
}
