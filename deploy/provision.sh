#!/usr/bin/env bash
# Provisions one meshnet node (Debian 12, as root), the same way for Vagrant VMs and for the
# nspawn machines of scripts/test: runtime packages, scripts/install, then
# - the manager node (--addr equal to --manager-addr) starts mesh-manager and writes the worker
#   join token to <shared>/worker.token;
# - every node (the manager node too) waits for that token, joins with mesh-agent and waits
#   until the agent is ready (systemd's Type=notify).
#
#   deploy/provision.sh --hostname node2 --addr 192.168.56.12 --manager-addr 192.168.56.11 \
#       --shared DIR [--bin-dir DIR] [--agent-opts "--lb nftables"] [--manager-opts "..."]
#       [--token-timeout 600]
#
# --shared: a directory every node sees (Vagrant's synced folder); --bin-dir: the built binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

hostname= addr= manager_addr= shared= bin_dir= agent_opts= manager_opts= token_timeout=600
while [ $# -gt 0 ]; do
    case $1 in
        --hostname) hostname=$2; shift 2 ;;
        --addr) addr=$2; shift 2 ;;
        --manager-addr) manager_addr=$2; shift 2 ;;
        --shared) shared=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --agent-opts) agent_opts=$2; shift 2 ;;
        --manager-opts) manager_opts=$2; shift 2 ;;
        --token-timeout) token_timeout=$2; shift 2 ;;
        *) echo "provision: unknown argument $1" >&2; exit 2 ;;
    esac
done
for v in hostname addr manager_addr shared; do
    [ -n "${!v}" ] || { echo "provision: --${v//_/-} is required" >&2; exit 2; }
done
say() { echo "provision[$hostname]: $*"; }
t0=$(date +%s.%N)
elapsed() { echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}'; }

# Runtime packages, only the missing ones (the nspawn image has them all: no network there).
# nftables: the agent runs nft; ipvsadm: to look at IPVS.
packages=(iproute2 nftables curl ipvsadm kmod)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# IPVS and VXLAN as modules where the kernel has them (VMs); a container cannot load any.
if command -v modprobe >/dev/null && [ -d "/lib/modules/$(uname -r)" ]; then
    printf '%s\n' ip_vs ip_vs_rr vxlan >/etc/modules-load.d/meshnet.conf
    modprobe -a ip_vs ip_vs_rr vxlan 2>/dev/null || say "some kernel modules did not load"
fi
hostnamectl set-hostname "$hostname" 2>/dev/null || hostname "$hostname" 2>/dev/null || true

bin=()
[ -n "$bin_dir" ] && bin=(--bin-dir "$bin_dir")
token_file=$shared/worker.token
if [ "$addr" = "$manager_addr" ]; then
    # A token left by an earlier cluster must not be read by this one's workers.
    rm -f "$token_file"
    "$repo/scripts/install" --role manager --advertise-addr "$addr" --manager-opts "$manager_opts" "${bin[@]}"
    systemctl enable --now mesh-manager
    mkdir -p "$shared"
    meshctl join-token worker --quiet >"$token_file.new"
    mv -f "$token_file.new" "$token_file"
    say "mesh-manager ready after $(elapsed)s; worker token in $token_file"
fi

deadline=$(($(date +%s) + token_timeout))
until [ -s "$token_file" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { say "no join token in $token_file after ${token_timeout}s"; exit 1; }
    sleep 1
done
"$repo/scripts/install" --role worker --advertise-addr "$addr" --hostname "$hostname" \
    --manager "$manager_addr:2377" --token-file "$token_file" --agent-opts "$agent_opts" "${bin[@]}"
# Returns once the agent has joined and run its first reconcile pass.
systemctl enable --now mesh-agent
say "mesh-agent ready after $(elapsed)s"
