#!/usr/bin/env bash
# Installs every prerequisite that is missing on a fresh Debian 12 machine (run as root).
# Idempotent: each step checks first, so a second run costs a few seconds.
set -euo pipefail
log() { printf '[bootstrap] %s\n' "$*"; }

APT_PKGS=(llvm-22-dev iproute2 ethtool nftables tcpdump bpftool redis-tools etcd-server iperf3 python3 protobuf-compiler libprotobuf-dev)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    log "apt could not install one of: ${missing[*]} (see above)"; exit 1
  fi
fi
# etcd-server's package starts a system etcd on 2379; tests run their own members.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now etcd >/dev/null 2>&1 || true; fi
pkill -x etcd 2>/dev/null || true

if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup: nightly rust-src (eBPF build-std)"
  rustup toolchain install nightly --profile minimal --component rust-src
fi
if ! rustup target list --installed | grep -q '^x86_64-unknown-none$'; then
  log "rustup: target x86_64-unknown-none (guest kernel)"
  rustup target add x86_64-unknown-none
fi
for c in clippy rustfmt; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0.13.0'; then
  log "cargo: bpf-linker 0.13.0 against Debian's LLVM 22 (~80 s)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features llvm-22
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs"
log "prerequisites present"
