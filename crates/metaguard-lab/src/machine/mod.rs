//! The machine lab: a real init. A Debian root file system booted by
//! `systemd-nspawn` with systemd as PID 1, inside a bare-host lab's host
//! namespace ([`crate::LabOptions::bare_host`]), so that what users install
//! — the `.deb`, its unit, its drop-ins — runs as it would on an instance:
//! started, ordered, sandboxed, reloaded and stopped by systemd, beside a
//! Docker and an ECS agent that start after it (the stand-ins of
//! [`crate::standin`], run by their own units).
//!
//! ```text
//!  root netns ─ (nothing) ─┐
//!   vpc  (IMDS emulator, vpcbr) ── eth0 ── host netns = the machine's network
//!                                           systemd (PID 1 of its pid namespace)
//!                                           ├─ metaguard.service   (from the .deb)
//!                                           ├─ docker.socket/.service  (stand-in dockerd)
//!                                           └─ ecs.service          (stand-in agent)
//! ```
//!
//! * [`Rootfs`]: built once by `scripts/init-rootfs` (mmdebstrap, minbase,
//!   systemd) under `target/init-lab/rootfs`, read-only from then on.
//! * [`Disk`]: an overlay on the rootfs — the machine's disk, kept across
//!   reboots, gone with the `Disk` — and the machine's cgroup
//!   (`metaguard-lab/<disk id>/machine`, the same on every boot, so a config
//!   on the disk may name cgroups inside it).
//! * [`Machine`]: one boot. Each boot gets a fresh lab (a fresh "kernel":
//!   no rules, no addresses, no pins survive a reboot, as on a real host),
//!   the stand-in binary and a control directory bound in.
//! * [`Host`]: the three together, for tests and benchmarks.
//!
//! Safety: the machine has no network but the lab's host namespace, which
//! has no link to the root namespace; `/proc/sys` is writable only for
//! `net.*` (the lab's own namespace); nspawn runs in the disk's cgroup,
//! removed with everything in it (also after a crash, by the next lab).
//! Configs in tests select cgroups only inside the machine's own
//! (`Host::cgroup_root`): the machine sees the whole hierarchy, and a
//! selector above it would reach other labs' processes.

mod disk;
mod host;
mod nspawn;
mod rootfs;

pub use disk::Disk;
pub use host::{Host, HostOptions, Member, Probed, RunningTask};
pub use nspawn::{first_at, JournalLine, Machine};
pub use rootfs::Rootfs;
