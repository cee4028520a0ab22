//! Workload identity (DESIGN §17): the OIDC ID tokens GitHub Actions, GitLab CI and
//! Kubernetes issue to jobs and pods, verified against their issuers' published keys.
//!
//! - [`verify`] (pure): one token and a key set → the verified claims, or the check that
//!   failed; JWKS parsing.
//! - [`provider`]: each provider's keys at run time — discovery, JWKS over the upstream
//!   client's rustls (plus the provider's `ca_file`), periodic refresh, the rate-limited
//!   refetch for an unknown `kid` — kept across reloads by the [`provider::Registry`].
//!
//! Which client a verified token is, by its claims, is `client`'s business. Imports
//! `config` and `forward`.

pub mod provider;
pub mod verify;

pub use provider::{Provider, Refetch, Registry};
pub use verify::{Check, KeySet, Rules, Verified};
