//! fedlora coordinator: runs federated rounds, aggregates LoRA adapters and keeps every round,
//! participant, metric and global adapter in a [`store::Store`].

pub mod aggregate;
pub mod bench;
pub mod config;
pub mod grpc;
pub mod limits;
pub mod pki;
pub mod rounds;
pub mod server;
pub mod store;
pub mod tls;
