//! Backend `embedded`: a single arbiter process (`ft-arbiter`) and its client.
mod client;
pub mod metrics;
pub mod proto;
mod server;

pub use client::EmbeddedArbiter;
pub use server::{STATE_FILE, ServerOptions, serve, serve_with, serve_with_metrics};
