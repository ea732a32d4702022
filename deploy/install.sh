#!/usr/bin/env bash
# Install kvmha on this machine: `deploy/install.sh manager` or `deploy/install.sh agent` (as root).
# Puts a venv in /opt/kvmha/venv, example configs in /etc/kvmha (never overwriting yours) and the systemd unit.
set -euo pipefail
role=${1:-}
case "$role" in manager|agent) ;; *) echo "usage: $0 manager|agent" >&2; exit 2;; esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root" >&2; exit 1; }
src=$(cd "$(dirname "$0")/.." && pwd)

packages="python3-venv python3-dev gcc pkg-config"
[ "$role" = agent ] && packages="$packages libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-dev libvirt-clients iputils-ping"
[ "$role" = manager ] && packages="$packages libvirt-dev ipmitool"  # libvirt-python builds against libvirt-dev
missing=$(for p in $packages; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

python=$(command -v python3.11 || command -v python3)
[ -x /opt/kvmha/venv/bin/python ] || "$python" -m venv /opt/kvmha/venv
/opt/kvmha/venv/bin/pip install -q --upgrade pip
/opt/kvmha/venv/bin/pip install -q "$src"

install -d -m 0750 /etc/kvmha
if [ ! -e "/etc/kvmha/$role.toml" ]; then
  install -m 0640 "$src/deploy/config/$role.toml" "/etc/kvmha/$role.toml"
  echo "wrote /etc/kvmha/$role.toml: edit it before starting the service"
fi
install -m 0644 "$src/deploy/systemd/kvmha-$role.service" /etc/systemd/system/
if [ "$role" = agent ]; then
  # kvmha-watchdog: resets this host when the agent stops keeping it alive (docs/watchdog.md).
  [ -e /etc/kvmha/watchdog.toml ] || install -m 0640 "$src/deploy/config/watchdog.toml" /etc/kvmha/watchdog.toml
  install -m 0644 "$src/deploy/systemd/kvmha-watchdog.service" /etc/systemd/system/
  # No hardware watchdog driver (no /sys/class/watchdog entry): the kernel's software one, now and at every boot.
  # softdog resets the machine from a kernel timer; it cannot fire if the kernel itself hangs with interrupts off,
  # which a hardware watchdog (iTCO_wdt, ipmi_watchdog, ...) can: prefer one where the board has it.
  if [ -z "$(ls -A /sys/class/watchdog 2>/dev/null)" ]; then
    modprobe softdog && echo softdog > /etc/modules-load.d/kvmha-softdog.conf \
      && echo "loaded softdog (no hardware watchdog found); /etc/modules-load.d/kvmha-softdog.conf loads it at boot"
  fi
fi
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$role" = agent ]; then
    echo "then: systemctl enable --now kvmha-watchdog kvmha-agent"
  else
    echo "then: systemctl enable --now kvmha-$role"
  fi
fi
