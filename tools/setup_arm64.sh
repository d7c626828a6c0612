#!/usr/bin/env bash
# An emulated arm64 target for the tests (issue 18): Debian bookworm arm64 in a chroot, run
# through qemu-user via binfmt_misc. Idempotent; safe to run again (each step is skipped when
# already done) and from several processes one after another (a lock serializes them).
#
#   tools/setup_arm64.sh            # build / check; prints the root path on the last line
#
# SLMEDGE_ARM64_ROOT   where the root filesystem lives (default /var/cache/slmedge/arm64-bookworm,
#                      outside the checkout, so every run on this machine reuses it)
# SLMEDGE_ARM64_MIRROR Debian mirror for debootstrap (default: the one apt uses here)
#
# Steps: apt-get install qemu-user-static debootstrap -> mount binfmt_misc -> register
# qemu-aarch64 with the F (fix-binary) flag, so the interpreter is opened at registration and
# works inside a chroot that does not contain it -> debootstrap --arch=arm64 --variant=minbase
# (python3, python3-venv, openssh-server) -> /proc mounted in the root (psutil, sshd) ->
# marker file. A root without the marker (an interrupted build) is removed and rebuilt.
#
# Exit codes: 0 ready; 2 this machine cannot run an emulated arm64 target (not root, no
# binfmt_misc, no apt): the message says why and the arm64 tests skip with it; 1 other errors.
set -euo pipefail

ROOT="${SLMEDGE_ARM64_ROOT:-/var/cache/slmedge/arm64-bookworm}"
MARKER="$ROOT/.slmedge-rootfs-complete"
BINFMT=/proc/sys/fs/binfmt_misc
CONF=/usr/lib/binfmt.d/qemu-aarch64.conf
PACKAGES=python3,python3-venv,openssh-server,ca-certificates

cannot() { echo "setup_arm64: cannot set up the emulated arm64 target: $*" >&2; exit 2; }
step_start=0
step() { step_start=$(date +%s); echo "setup_arm64: $*"; }
done_step() { echo "setup_arm64:   ... $(( $(date +%s) - step_start )) s"; }

[ "$(uname -m)" = aarch64 ] && cannot "this machine is already arm64 (use a real target)"
[ "$(id -u)" = 0 ] || cannot "needs root (apt-get, mount binfmt_misc, debootstrap, chroot); run it with sudo"

mkdir -p "$(dirname "$ROOT")"
exec 9>"$(dirname "$ROOT")/.$(basename "$ROOT").lock"
flock 9

# 1. packages
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
    || [ ! -f "$CONF" ]; then
  command -v apt-get >/dev/null || cannot "no apt-get: install qemu-user-static and debootstrap by hand"
  step "apt-get install qemu-user-static debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q qemu-user-static debootstrap >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q qemu-user-static debootstrap >/dev/null; }
  done_step
fi

# 2. binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
  step "mount binfmt_misc"
  mount -t binfmt_misc binfmt_misc "$BINFMT" 2>/dev/null \
    || cannot "binfmt_misc is not mounted and cannot be (a container without it? run with --privileged, or mount it on the host)"
  done_step
fi

# 3. qemu-aarch64 handler. Debian registers it through systemd-binfmt / update-binfmts, which
# need systemd or binfmt-support running; without them, write the same line (the package's
# /usr/lib/binfmt.d file, already in the kernel's register format) ourselves.
if [ -e "$BINFMT/qemu-aarch64" ] && ! grep -q '^flags:.*F' "$BINFMT/qemu-aarch64"; then
  step "re-register qemu-aarch64 (registered without the F flag: would fail inside a chroot)"
  echo -1 >"$BINFMT/qemu-aarch64"
  done_step
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  step "register qemu-aarch64 with binfmt_misc"
  line=$(grep -v '^#' "$CONF" | head -n 1)
  case "$line" in *:*F*) ;; *) line="${line}F" ;; esac
  printf '%s' "$line" >"$BINFMT/register" 2>/dev/null \
    || cannot "writing $BINFMT/register failed (read-only binfmt_misc, e.g. in an unprivileged container)"
  done_step
fi
grep -q '^enabled' "$BINFMT/qemu-aarch64" || echo 1 >"$BINFMT/qemu-aarch64"

# 4. the root filesystem
if [ ! -f "$MARKER" ]; then
  if [ -e "$ROOT" ]; then
    step "removing an incomplete root filesystem at $ROOT"
    for m in proc sys dev/pts; do umount -l "$ROOT/$m" 2>/dev/null || true; done
    rm -rf --one-file-system "$ROOT"
    done_step
  fi
  mirror="${SLMEDGE_ARM64_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror=$( (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources; \
               grep -hs '^deb ' /etc/apt/sources.list | awk '{print "URIs: " $2}') \
             | awk '{print $2}' | grep -v security | head -n 1) || true
    mirror="${mirror:-http://deb.debian.org/debian}"
  fi
  step "debootstrap --arch=arm64 --variant=minbase bookworm $ROOT ($mirror)"
  debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" bookworm "$ROOT" "$mirror" \
    >"$(dirname "$ROOT")/debootstrap-$(basename "$ROOT").log" 2>&1 \
    || { tail -n 30 "$(dirname "$ROOT")/debootstrap-$(basename "$ROOT").log" >&2;
         echo "setup_arm64: debootstrap failed (log: $(dirname "$ROOT")/debootstrap-$(basename "$ROOT").log)" >&2;
         exit 1; }
  done_step
  # No host keys baked in: the tests bring their own; sshd wants its privilege-separation dir.
  rm -f "$ROOT"/etc/ssh/ssh_host_*
  mkdir -p "$ROOT/run/sshd" "$ROOT/root/.ssh"
  chmod 700 "$ROOT/root/.ssh"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$MARKER"
fi

# 5. what a running target needs, every time (mounts do not survive a reboot)
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true  # pip inside the chroot
# The host's trust store (a proxy's CA, e.g.), so pip on the target reaches PyPI as pip here does;
# pip uses its own certifi bundle unless told, hence /etc/pip.conf.
if [ -s /etc/ssl/certs/ca-certificates.crt ] \
    && ! cmp -s /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi
grep -qs '^cert' "$ROOT/etc/pip.conf" \
  || printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >>"$ROOT/etc/pip.conf"
mkdir -p "$ROOT/run/sshd"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# No /sys on purpose: with the host's sysfs (an x86 CPU topology, no ARM MIDR registers) ONNX
# Runtime's CPU detection (pytorch cpuinfo) crashes the emulated process (SIGSEGV, measured
# with onnxruntime 1.32.0 / qemu 7.2); without it, cpuinfo fails cleanly (warnings on stderr)
# and ORT picks its ARM kernels from the HWCAP bits qemu reports for QEMU_CPU.
chroot "$ROOT" /usr/bin/python3 -c 'import platform, venv; assert platform.machine() == "aarch64", platform.machine()' \
  || { echo "setup_arm64: python3 in $ROOT does not run as aarch64 through qemu" >&2; exit 1; }
echo "$ROOT"
