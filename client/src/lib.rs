//! fedlora client: fine-tunes LoRA adapters of a Llama-family model on a site's private data with
//! candle, and runs the daemon that takes tasks from the coordinator.
//!
//! Architecture invariant: the only things that leave this crate for the network are adapter
//! tensors, example/token counts and loss metrics (see [`daemon`]); text, tokens and per-example
//! values never do.

pub mod bench;
pub mod chat;
pub mod compute;
pub mod daemon;
pub mod error;
pub mod generate;
pub mod model;
#[cfg(test)]
mod testing;
pub mod tiny;
pub mod train;

pub use error::ClientError;
