# Shared by scripts/test and scripts/demo: install what meshnet needs on a Debian machine,
# idempotently (only what is missing), then build. Sourced, not run.

APT_PACKAGES=(iproute2 iputils-ping nftables iptables ipvsadm iperf3 curl wrk tcpdump conntrack dnsmasq-base dnsperf
              busybox-static kmod procps protobuf-compiler etcd-server etcd-client psmisc python3-pip qemu-system-x86 linux-image-amd64)

log() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "meshnet's lab builds network namespaces: run this as root" >&2
        exit 1
    fi
}

ensure_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "apt: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# virtme-ng boots the guest kernel (the host kernel has no IPVS).
ensure_vng() {
    local scripts
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    case ":$PATH:" in *":$scripts:"*) ;; *) PATH="$scripts:$PATH" ;; esac
    if ! command -v vng >/dev/null 2>&1; then
        log "pip: installing virtme-ng"
        python3 -m pip install -q virtme-ng 2>/dev/null ||
            python3 -m pip install -q --break-system-packages virtme-ng
    fi
    command -v vng >/dev/null || { echo "vng not found after installing virtme-ng" >&2; exit 1; }
}

ensure_rust() {
    [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
        exit 1
    fi
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true
}

setup() {
    need_root
    ensure_packages
    ensure_rust
}
