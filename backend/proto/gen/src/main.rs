//! Writes backend/src/grpc/imn.v1.rs from backend/proto/imn/v1/imn.proto.
fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(root.join("src/grpc"))
        .compile_protos(&[root.join("proto/imn/v1/imn.proto")], &[root.join("proto")])
        .expect("protoc and the proto file");
}
