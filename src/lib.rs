//! The `fedlora` command: one binary for the coordinator, the client daemon, the operator CLI and
//! the demo. It only parses arguments and wires the library crates together:
//! `fedlora-coordinator` and `fedlora-client` (which never depend on each other) over
//! `fedlora-proto`.

pub mod admin;
pub mod ca;
pub mod cli;
pub mod demo;
pub mod quality;
pub mod sites;
pub mod train;
