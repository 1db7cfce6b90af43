//! The fedlora wire: the generated `fedlora.v1` gRPC types, and the adapter domain type with its
//! safetensors codec and PEFT naming, shared by the coordinator and the client.
//!
//! Only the gRPC layers of the coordinator and the client touch [`v1`]; everything else speaks
//! [`adapter`] types.

pub mod adapter;

/// Generated protobuf and tonic code for `fedlora.v1`.
#[allow(clippy::all, missing_docs, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("fedlora.v1");
}

/// Size of one chunk of adapter bytes on the wire (uploads and downloads).
pub const CHUNK_BYTES: usize = 1 << 20;
