//! tern's NBD server: presents each disk of a protected VM as an NBD export
//! and sends every request through the mirror (`tern-driver`), so every
//! write is journaled before it is acknowledged.
//!
//! - [`protocol`]: wire constants, request parsing and validation, reply
//!   encoding — no I/O, unit-tested and fuzzed alone;
//! - [`handshake`]: fixed-newstyle option haggling;
//! - [`transmission`]: pipelined requests on a team of worker threads;
//! - [`server`]: sockets and connections.
#![deny(unsafe_code)]

pub mod client;
pub mod handshake;
pub mod protocol;
pub mod server;
pub mod transmission;

pub use server::{Listen, Listener, Server, ServerOptions};
