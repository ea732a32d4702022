#!/usr/bin/env bash
# Install kvmha on this machine: `deploy/install.sh manager` or `deploy/install.sh agent` (as root).
# Puts a venv in /opt/kvmha/venv, example configs in /etc/kvmha (never overwriting yours) and the systemd unit; the
# manager runs as its own user `kvmha` with its state in /var/lib/kvmha (0700).
#
#   --root DIR   install the files under DIR instead of / (packaging, and tests/integration/test_deploy.py)
#   --dry-run    change nothing outside --root: print the apt, pip, useradd, chown and systemctl steps instead
set -euo pipefail
root="" dry=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2%/}; shift 2;;
    --dry-run) dry=1; shift;;
    manager|agent) role=$1; shift;;
    *) echo "usage: $0 [--root DIR] [--dry-run] manager|agent" >&2; exit 2;;
  esac
done
role=${role:-}
[ -n "$role" ] || { echo "usage: $0 [--root DIR] [--dry-run] manager|agent" >&2; exit 2; }
[ -n "$dry" ] || [ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)
umask 0022
run() { if [ -n "$dry" ]; then echo "would run: $*"; else "$@"; fi; }

packages="python3-venv python3-dev gcc pkg-config"
[ "$role" = agent ] && packages="$packages libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-dev libvirt-clients iputils-ping"
[ "$role" = manager ] && packages="$packages libvirt-dev ipmitool"  # libvirt-python builds against libvirt-dev
missing=$(for p in $packages; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  run env DEBIAN_FRONTEND=noninteractive apt-get update -q
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

python=$(command -v python3.11 || command -v python3)
venv="$root/opt/kvmha/venv"
[ -x "$venv/bin/python" ] || run "$python" -m venv "$venv"
run "$venv/bin/pip" install -q --upgrade pip
run "$venv/bin/pip" install -q "$src"

install -d -m 0755 "$root/etc/systemd/system"
if [ "$role" = manager ]; then
  # The manager's own user: it reads /etc/kvmha (group kvmha) and owns its state; nothing else of the machine.
  getent passwd kvmha >/dev/null 2>&1 || run useradd --system --user-group --home-dir /var/lib/kvmha \
    --shell /usr/sbin/nologin --comment "kvmha manager" kvmha
  install -d -m 0750 "$root/etc/kvmha" "$root/etc/kvmha/pki"
  install -d -m 0700 "$root/var/lib/kvmha"
  run chown root:kvmha "$root/etc/kvmha" "$root/etc/kvmha/pki"
  run chown kvmha:kvmha "$root/var/lib/kvmha"
else
  install -d -m 0700 "$root/etc/kvmha" "$root/etc/kvmha/pki"
fi
if [ ! -e "$root/etc/kvmha/$role.toml" ]; then
  install -m 0640 "$src/deploy/config/$role.toml" "$root/etc/kvmha/$role.toml"
  echo "wrote $root/etc/kvmha/$role.toml: edit it before starting the service"
fi
[ "$role" = manager ] && run chown root:kvmha "$root/etc/kvmha/$role.toml"
install -m 0644 "$src/deploy/systemd/kvmha-$role.service" "$root/etc/systemd/system/"
if [ "$role" = agent ]; then
  # kvmha-watchdog: resets this host when the agent stops keeping it alive (docs/watchdog.md).
  [ -e "$root/etc/kvmha/watchdog.toml" ] || install -m 0640 "$src/deploy/config/watchdog.toml" "$root/etc/kvmha/watchdog.toml"
  install -m 0644 "$src/deploy/systemd/kvmha-watchdog.service" "$root/etc/systemd/system/"
  # No hardware watchdog driver (no /sys/class/watchdog entry): the kernel's software one, now and at every boot.
  # softdog resets the machine from a kernel timer; it cannot fire if the kernel itself hangs with interrupts off,
  # which a hardware watchdog (iTCO_wdt, ipmi_watchdog, ...) can: prefer one where the board has it.
  if [ -z "$(ls -A /sys/class/watchdog 2>/dev/null)" ]; then
    install -d -m 0755 "$root/etc/modules-load.d"
    run modprobe softdog && echo softdog > "$root/etc/modules-load.d/kvmha-softdog.conf" \
      && echo "softdog (no hardware watchdog found): $root/etc/modules-load.d/kvmha-softdog.conf loads it at boot"
  fi
fi
echo "certificates (mutual TLS, docs/security.md): put them in $root/etc/kvmha/pki (kvmha pki ...)"
[ "$role" = agent ] && echo "live migration ([migration] in agent.toml, default qemu+tls): the same host certificate" \
  "for libvirtd and QEMU in /etc/pki, and libvirtd-tls.socket (docs/operations.md, Migration transport)"
if command -v systemctl >/dev/null && [ -d /run/systemd/system ] && [ -z "$root" ]; then
  run systemctl daemon-reload
  if [ "$role" = agent ]; then
    echo "then: systemctl enable --now kvmha-watchdog kvmha-agent"
  else
    echo "then: systemctl enable --now kvmha-$role"
  fi
fi
