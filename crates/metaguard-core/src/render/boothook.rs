//! The `#cloud-boothook` script: installs the config and applies a
//! fail-closed ruleset on every boot, before Docker and the ECS agent
//! start (F5).
//!
//! cloud-init runs boothooks on *every* boot, early in its init stage
//! (cloud-init.service, ordered before the network-online target that
//! docker.service and ecs.service wait for). It strips the
//! `#cloud-boothook` line and executes the rest, so the second line is the
//! interpreter. POSIX sh: no bashisms, shellcheck-clean.
//!
//! Fail-closed, in order: `metaguard apply`; when the binary is missing or
//! fails, the same host ruleset loaded with `nft -f` (embedded here —
//! rendered by the same rule builder); when that fails too, docker and ecs
//! are masked for this boot (runtime only) so no container runs unguarded.

use crate::ruleset::{self, HostFacts};

use super::{installed_text, Kind, Options, RenderError, Source, Stamp};

pub fn render(stamp: &Stamp, src: &Source<'_>, opts: &Options) -> Result<String, RenderError> {
    let plan = ruleset::plan(src.config, &HostFacts::default())?;
    let config_eof = format!("METAGUARD_CONFIG_{}", stamp.short());
    let nft_eof = format!("METAGUARD_NFT_{}", stamp.short());
    let text = installed_text(src.text);
    for marker in [&config_eof, &nft_eof] {
        if text.lines().any(|l| l == marker.as_str()) {
            return Err(RenderError::MarkerCollision {
                kind: Kind::Boothook,
                marker: marker.clone(),
            });
        }
    }
    let bin = &opts.binary;
    let cfg = &opts.config_path;
    let nft = &plan.host;
    Ok(format!(
        "\
#cloud-boothook
#!/bin/sh
# metaguard boothook: installs the metaguard config and applies a fail-closed
# ruleset on every boot, before Docker and the ECS agent start (F5).
{stamp}#
# cloud-init runs boothooks on every boot, early in its init stage. Each run:
#   1. installs the config below as {cfg} (atomically);
#   2. runs `{bin} apply` with it;
#   3. if the binary is missing or fails, loads the same host ruleset with nft;
#   4. if that fails too, masks docker and ecs for this boot, so that no
#      container runs unguarded, and exits 1.
# Running it again changes nothing: the config is rewritten with the same
# bytes and the ruleset is replaced as a whole in one nft transaction.
set -u
umask 022
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

metaguard={bin}
config={cfg}

log() {{
  echo \"metaguard boothook: $*\" >&2
}}

install_config() {{
  dir=$(dirname \"$config\") || return 1
  mkdir -p \"$dir\" || return 1
  tmp=\"$config.boothook-$$\"
  cat >\"$tmp\" <<'{config_eof}' || {{ rm -f \"$tmp\"; return 1; }}
{text}{config_eof}
  chmod 0644 \"$tmp\" && mv -f \"$tmp\" \"$config\"
}}

# The host ruleset `metaguard apply` loads for this config (task namespaces
# are added by `metaguard apply` and the daemon once tasks exist).
load_fallback() {{
  nft -f - <<'{nft_eof}'
{nft}{nft_eof}
}}

if install_config; then
  if [ -x \"$metaguard\" ]; then
    if \"$metaguard\" apply --config \"$config\"; then
      log \"rules applied by $metaguard\"
      exit 0
    fi
    log \"$metaguard apply failed; loading the embedded ruleset with nft\"
  else
    log \"$metaguard is not installed; loading the embedded ruleset with nft\"
  fi
else
  log \"cannot write $config; loading the embedded ruleset with nft\"
fi
if load_fallback; then
  log \"rules applied by nft (embedded ruleset)\"
  exit 0
fi
log \"no ruleset could be installed: masking docker and ecs for this boot so that no container runs unguarded\"
if [ -d /run/systemd/system ]; then
  systemctl mask --runtime docker.socket docker.service ecs.service >&2 || true
fi
exit 1
",
        stamp = stamp.lines("# ", Kind::Boothook),
    ))
}
