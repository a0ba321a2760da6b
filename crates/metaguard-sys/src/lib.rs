//! The only metaguard crate that may use `unsafe` or talk to libc directly.
//!
//! Owns: entering network namespaces (per thread, and in a child between
//! `fork` and `exec`), finding and using the cgroup v2 hierarchy, and
//! process identity (pid + start time) for clean-up; running external
//! programs ([`tool`]: one search path, one error); policy routing and `lo`
//! addresses over rtnetlink ([`routing`]); and the host seam ([`host`]) the
//! engine runs on, with a recording fake (feature `fake`) for tests.
//!
//! Must not: decide policy. Functions here do one kernel operation each and
//! report failures with the object they failed on (path, namespace, pid).
//! Every `unsafe` block carries a `// SAFETY:` argument.

pub mod bpf;
pub mod cgroup;
pub mod host;
pub mod netns;
pub mod nft;
pub mod process;
pub mod routing;
pub mod rtnl;
pub mod seccomp;
pub mod sockdiag;
pub mod systemd;
pub mod tool;
