#!/usr/bin/env bash
# Installs every prerequisite that is missing on a fresh Debian 12 machine (run as root).
# Idempotent: each step checks first, so a second run costs a few seconds.
set -euo pipefail
log() { printf '[bootstrap] %s\n' "$*"; }

APT_PKGS=(iproute2 ethtool nftables tcpdump bpftool redis-tools redis-server etcd-server iperf3 python3 protobuf-compiler libprotobuf-dev prometheus systemd)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The packages install without starting their services (Debian's policy-rc.d: 101 =
  # "action forbidden"): etcd-server would start a system etcd on 2379, redis-server a
  # Redis on 6379, and the tests and benchmarks run their own, inside the testbed's
  # namespaces. A policy the machine already has is left as it is; services the machine
  # already ran are never touched.
  own_policy=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  ok=1
  apt-get install -y -qq --no-install-recommends "${missing[@]}" || ok=
  if [[ -n "$own_policy" ]]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [[ -z "$ok" ]]; then
    log "apt could not install one of: ${missing[*]} (see above)"; exit 1
  fi
  # Nor do they start at the next boot: only the services of packages installed just now.
  if command -v systemctl >/dev/null 2>&1; then
    for p in "${missing[@]}"; do
      case "$p" in
        etcd-server) systemctl disable etcd >/dev/null 2>&1 || true ;;
        redis-server) systemctl disable redis-server >/dev/null 2>&1 || true ;;
        # Only promtool is used (the alert rules' checks), never the server.
        prometheus) systemctl disable prometheus >/dev/null 2>&1 || true ;;
      esac
    done
  fi
fi

# eBPF programs build with nightly (-Z build-std=core). Never update an existing nightly
# here: bpf-linker below is linked against that nightly's own libLLVM.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup: installing nightly"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup: nightly rust-src (eBPF build-std)"
  rustup component add rust-src --toolchain nightly
fi
if ! rustup target list --installed | grep -q '^x86_64-unknown-none$'; then
  log "rustup: target x86_64-unknown-none (guest kernel)"
  rustup target add x86_64-unknown-none
fi
for c in clippy rustfmt; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

# bpf-linker must read the bitcode the nightly emits, so it is linked against the very
# libLLVM that ships inside the nightly (no system LLVM needed, and it stays right when
# the nightly changes: a stamp records which libLLVM it was built for).
SYSROOT=$(rustc +nightly --print sysroot)
LIBLLVM=$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -1)
LLVM_MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n "$LIBLLVM" && -n "$LLVM_MAJOR" ]] || { log "nightly ships no libLLVM.so: cannot build bpf-linker"; exit 1; }
case "$LLVM_MAJOR" in 21|22|23) ;; *) log "nightly uses LLVM $LLVM_MAJOR; bpf-linker 0.13.0 supports 21-23"; exit 1;; esac
STAMP="${CARGO_HOME:-$HOME/.cargo}/bpf-linker.libllvm"
if ! command -v bpf-linker >/dev/null 2>&1 || [[ "$(cat "$STAMP" 2>/dev/null)" != "$LIBLLVM" ]]; then
  PREFIX="${CARGO_HOME:-$HOME/.cargo}/ft-llvm/$(basename "$LIBLLVM")"
  mkdir -p "$PREFIX/lib"
  ln -sf "$LIBLLVM" "$PREFIX/lib/libLLVM.so"
  ln -sf "$LIBLLVM" "$PREFIX/lib/$(basename "$LIBLLVM")"
  log "cargo: bpf-linker 0.13.0 against the nightly's LLVM $LLVM_MAJOR (~2 min)"
  LLVM_PREFIX="$PREFIX" cargo install bpf-linker --version 0.13.0 --locked --force \
    --no-default-features --features "llvm-$LLVM_MAJOR"
  echo "$LIBLLVM" > "$STAMP"
fi

# The packages (`cargo xtask package`, and the test that installs them) are built with
# cargo-deb.
if [[ "$(cargo deb --version 2>/dev/null)" != *"3.8.0"* ]]; then
  log "cargo: cargo-deb 3.8.0 (~1 min)"
  cargo install cargo-deb --version 3.8.0 --locked --force
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs"
log "prerequisites present"
