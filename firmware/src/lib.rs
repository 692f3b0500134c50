//! The appliance side of Isthmus: what the gateway needs on first start and at every start.
//!
//! - [`state`]: the state directory (`/var/lib/isthmus` on the appliance), created private.
//! - [`tls`]: a local certificate authority and a server certificate signed by it, provisioned
//!   on first start and reused (or renewed) afterwards, so that the gateway always terminates
//!   TLS with a chain that strict verifiers (OpenSSL's `-x509_strict`, Python 3.13's default
//!   context, rustls/webpki) accept once clients trust `ca.pem`.
//! - [`hardware`]: a probe of CPUs, vector extensions and memory, from which the gateway picks
//!   safe defaults (inference threads, which llama.cpp CPU kernels can run).
//! - [`update`]: signed update bundles installed into A/B slots, with a trial that rolls back
//!   to the previous slot when the new one does not become ready; [`keys`] reads and writes
//!   the Ed25519 keys that sign them (OpenSSL's PEM forms).
//! - [`service`]: systemd's notification protocol (`READY=1`, `RELOADING=1`, `STOPPING=1`,
//!   the watchdog), so the appliance's unit knows when the gateway serves and when it hangs.
//!
//! The decisions are pure functions over parsed data and an explicit `now`; the functions that
//! read files or the clock are thin wrappers around them.

pub mod hardware;
pub mod keys;
pub mod service;
pub mod state;
pub mod tls;
pub mod update;

mod files;

pub use hardware::{HardwareProfile, probe};
pub use service::{Notice, NotifyError, ServiceManager};
pub use state::{StateDir, StateError};
pub use tls::{
    CaProblem, ProvisionError, ProvisionOutcome, ProvisionedTls, RenewalReason, ServerCertProblem,
    default_tls_hosts, host_name, provision_tls, provision_tls_now,
};
