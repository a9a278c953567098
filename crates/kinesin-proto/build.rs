//! Generates the gRPC code from ../../proto with protox, a protobuf compiler
//! in Rust, so no system protoc is needed.

fn main() {
    // Relative to this crate: checkouts in different folders may share one
    // target directory, and absolute paths would watch the wrong checkout.
    let root = "../../proto";
    let files = ["kinesin/v1/raft.proto", "kinesin/v1/node.proto"];
    let descriptors = protox::compile(files, [root]).expect("compile protos");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_fds(descriptors)
        .expect("generate gRPC code");
    for file in files {
        println!("cargo:rerun-if-changed={root}/{file}");
    }
}
