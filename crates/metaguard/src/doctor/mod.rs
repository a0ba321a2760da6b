//! `metaguard doctor`'s I/O: collect this host's state into the snapshot
//! form ([`collect`]; the Docker API and daemon in [`docker`]), apply the fixes core proposes in the backend and
//! namespace where each problem lives ([`fix`]), and confirm verdicts with
//! real connections from a short-lived namespace ([`probe`]).
//!
//! Reading is all it does unless `--fix` is given. The analysis itself is
//! pure and lives in `metaguard_core::doctor`.

pub mod collect;
pub mod docker;
pub mod fix;
pub mod probe;
