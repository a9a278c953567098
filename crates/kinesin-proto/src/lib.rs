//! Generated protobuf and gRPC code for the internal and native APIs.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kinesin.v1");
}

pub mod tls;

/// Largest gRPC message any Kinesin endpoint sends or accepts: a frame or a
/// request holds at least one record batch, and records may be 10 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
