# shellcheck shell=bash
# Shared by scripts/demo and scripts/test: become root, install what is
# missing (Debian/Ubuntu), and never touch anything else on the host.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# System packages the lab and the tests use.
APT_PACKAGES=(nftables iptables iproute2 procps curl python3-venv conntrack libseccomp-dev)
# Validators for the deployment files and the package (tests/deploy): the
# linter shellcheck, systemd-analyze (from systemd: it verifies units without
# systemd as PID 1; --no-install-recommends keeps systemd-sysv, the init,
# out), lintian, man; and the Python modules cloud-init imports, since
# cloud-init itself is only extracted (ensure_cloud_init), never installed.
APT_PACKAGES+=(shellcheck systemd lintian man-db python3-yaml python3-jsonschema
  python3-jinja2 python3-configobj python3-jsonpatch python3-requests
  python3-oauthlib python3-netifaces python3-serial)
# The cgroup BPF layer: clang compiles crates/metaguard-sys/bpf/guard.bpf.c at
# build time against libbpf's headers (bpf_helpers.h) and the kernel UAPI
# headers (linux-libc-dev); aya loads the object, so no libbpf at run time.
# Without them the build fails (cargo feature `bpf`, on by default).
APT_PACKAGES+=(clang libbpf-dev linux-libc-dev)
# The machine lab (tests/machine): a Debian root file system built once with
# mmdebstrap (scripts/init-rootfs) and booted with systemd-nspawn; bpftool
# detaches and unpins the BPF layer's links in its tests.
APT_PACKAGES+=(mmdebstrap systemd-container bpftool)
# The load generator of the proxy benchmark (benches/proxy.rs): wrk, run only
# inside lab namespaces. nginx, its reference proxy, is extracted, never
# installed (ensure_nginx).
APT_PACKAGES+=(wrk)
# Real AWS SDK client for the tests (pinned for reproducibility).
BOTOCORE_VERSION="1.44.5"

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "metaguard: network namespaces need root; run this as root." >&2
      exit 2
    fi
    exec sudo --preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME,CI "$0" "$@"
  fi
}

ensure_apt_packages() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "metaguard: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    for d in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin; do
      [ -x "$d/cargo" ] && export PATH="$d:$PATH" && break
    done
  fi
  command -v cargo >/dev/null 2>&1 || { echo "metaguard: cargo not found; install Rust (rustup) first." >&2; exit 2; }
}

# rustfmt and clippy (scripts/test checks style and lints); a rustup
# "minimal" profile installs neither.
ensure_cargo_lints() {
  cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 && return 0
  if command -v rustup >/dev/null 2>&1; then
    echo "metaguard: adding the rustfmt and clippy components" >&2
    rustup component add rustfmt clippy
  else
    echo "metaguard: cargo fmt and cargo clippy are missing; install them (Debian: apt-get install rustfmt rust-clippy)." >&2
    exit 2
  fi
}

ensure_python_venv() {
  local venv="$REPO/.venv"
  if ! "$venv/bin/python" -c "import botocore; assert botocore.__version__ == '$BOTOCORE_VERSION'" 2>/dev/null; then
    echo "metaguard: creating $venv with botocore $BOTOCORE_VERSION" >&2
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "botocore==$BOTOCORE_VERSION"
  fi
  export METAGUARD_PYTHON="$venv/bin/python"
}

# Downloads Debian package $1's .deb into directory $2, refreshing the
# package lists first only when they do not have it yet.
download_deb() {
  (cd "$2" && apt-get download -qq "$1" >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$2" && apt-get download -qq "$1" >/dev/null); }
}

# cloud-init for the user-data tests, extracted into target/tools/cloud-init
# (apt-get download + dpkg -x): installing it would add boot-time units.
ensure_cloud_init() {
  local dest="$REPO/target/tools/cloud-init" tmp
  [ -f "$dest/usr/bin/cloud-init" ] && return 0
  echo "metaguard: extracting cloud-init into $dest (not installed)" >&2
  tmp="$(mktemp -d)"
  download_deb cloud-init "$tmp"
  rm -rf "$dest"
  mkdir -p "$dest"
  dpkg -x "$tmp"/cloud-init_*.deb "$dest"
  rm -rf "$tmp"
}

# The machine lab's root file system (target/init-lab/rootfs), once.
ensure_init_rootfs() {
  "$REPO/scripts/init-rootfs"
}

# cargo-deb builds the .deb (scripts/package, tests/deploy); ≈1 min once.
ensure_cargo_deb() {
  command -v cargo-deb >/dev/null 2>&1 && return 0
  echo "metaguard: installing cargo-deb" >&2
  cargo install --locked --quiet cargo-deb
}

# cargo-deny (the dependency check of scripts/test: licences, duplicate
# versions, sources; offline, see deny.toml). Built from crates.io once, in
# about 5–7 minutes on 2 cores.
ensure_cargo_deny() {
  command -v cargo-deny >/dev/null 2>&1 && return 0
  echo "metaguard: installing cargo-deny (once; a few minutes)" >&2
  cargo install --locked --quiet cargo-deny
}

# promtool (to check the daemon's metrics) from Debian's prometheus package,
# extracted, never installed: the package would start a Prometheus service.
ensure_promtool() {
  local dir="$REPO/.tools/promtool"
  if [ ! -x "$dir/usr/bin/promtool" ]; then
    echo "metaguard: extracting promtool from Debian's prometheus package into $dir" >&2
    local tmp; tmp="$(mktemp -d)"
    download_deb prometheus "$tmp"
    mkdir -p "$dir"
    dpkg -x "$tmp"/prometheus_*.deb "$dir"
    rm -rf "$tmp" "${dir:?}/usr/bin/prometheus" "${dir:?}/usr/share" "${dir:?}/etc" "${dir:?}/lib"
  fi
}

# nginx (the reference proxy of benches/proxy.rs) from Debian's nginx package,
# extracted into .tools/nginx, never installed: the package's postinst would
# start a service listening on :80 in the root namespace. The bench runs it
# inside a lab namespace with a config of its own (-p/-c/-e into its work
# dir). The shared libraries it links are the package's lib* dependencies;
# those ldd cannot find are installed.
ensure_nginx() {
  local dir="$REPO/.tools/nginx" bin="$REPO/.tools/nginx/usr/sbin/nginx"
  if [ ! -x "$bin" ]; then
    echo "metaguard: extracting nginx from Debian's nginx package into $dir (not installed)" >&2
    local tmp; tmp="$(mktemp -d)"
    download_deb nginx "$tmp"
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg -x "$tmp"/nginx_*.deb "$dir"
    dpkg-deb -f "$tmp"/nginx_*.deb Depends >"$dir/DEPENDS"
    rm -rf "$tmp" "${dir:?}/usr/share" "${dir:?}/etc" "${dir:?}/lib"
  fi
  if LC_ALL=C ldd "$bin" | grep -q "not found"; then
    local libs
    mapfile -t libs < <(tr ',' '\n' <"$dir/DEPENDS" | awk '{print $1}' | grep -E '^(lib|zlib)')
    echo "metaguard: installing nginx's libraries ${libs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${libs[@]}" >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${libs[@]}" >/dev/null; }
  fi
  "$bin" -v 2>/dev/null || { echo "metaguard: $bin does not run (ldd $bin)" >&2; exit 2; }
}
