//! The Isthmus gateway: the shell around the pure routing core and the inference runtime.
//!
//! It reads the configuration, terminates TLS, serves the OpenAI API through Pingora's HTTP
//! sessions, asks `router_policies` where each request runs and carries the decision out on
//! `edge_runtime`, and serves health, readiness and metrics on the admin listener. See
//! ARCHITECTURE.md for the map.

pub mod admin;
pub mod audit;
pub mod audit_trail;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client_address;
pub mod cloud;
pub mod config;
pub mod console;
pub mod daily_usage;
pub mod data_plane;
pub mod error;
pub mod export;
pub mod facts;
pub mod gpu;
pub mod identity;
pub mod listener;
pub mod local;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod probe;
pub mod rate_limit;
pub mod redaction;
pub mod reload;
pub mod response_store;
pub mod sensitivity;
pub mod serve;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod update;
