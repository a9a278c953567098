//! Generated protobuf and gRPC code for the internal and native APIs.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kinesin.v1");
}
