#!/usr/bin/env bash
# aarch64 check: run the edge unit tests on arm64 Debian bookworm (what a Pi runs) under qemu.
#
# Builds an arm64 root filesystem with debootstrap, runs it through qemu-user-static (binfmt_misc),
# installs the device requirements (requirements.txt) from the package registries inside it, copies
# this checkout in and runs the edge unit tests there. It proves the pinned wheels exist for aarch64
# and that nothing in edge/ assumes x86. Emulation makes it slow (an hour or more on 2 cores), so it
# is not part of CI; run it by hand after changing requirements.txt or edge/:
#
#   sudo apt-get install debootstrap qemu-user-static binfmt-support
#   sudo nice -n 10 deploy/aarch64-check.sh [ROOTFS_DIR]      # default /var/tmp/facegate-arm64
#
# The root filesystem and its venv are kept, so a second run only copies the repo and tests.
# MIRROR=... overrides debootstrap's default Debian mirror. Needs root (debootstrap, chroot).
# A Jetson (JetPack 6: Python 3.10, requirements-jetson.txt) is not covered here; its checks are in
# tests/unit/test_board_requirements.py.
set -euo pipefail

ROOT=${1:-/var/tmp/facegate-arm64}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# Tests that exercise edge/ only (no torch, no ../shared); the rest need the training venv.
TESTS=${TESTS:-"tests/unit/test_audit.py tests/unit/test_camera.py tests/unit/test_imageio.py tests/unit/test_relay.py tests/unit/test_gallery.py tests/unit/test_bundle.py tests/unit/test_service.py"}

say() { printf '== %s\n' "$*"; }
die() { printf 'aarch64-check: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
for tool in debootstrap qemu-aarch64-static; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install debootstrap qemu-user-static binfmt-support"
done

if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    say "registering qemu-aarch64 with binfmt_misc"
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 (is binfmt-support installed?)"
fi

cleanup() {
    for m in "$ROOT/dev" "$ROOT/proc"; do
        mountpoint -q "$m" && umount -l "$m"
    done
    return 0
}
trap cleanup EXIT

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    say "debootstrap arm64 bookworm into $ROOT"
    # shellcheck disable=SC2086  # MIRROR is optional: empty means debootstrap's default
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT" ${MIRROR:-}
fi
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# No /sys: with the host's (x86) CPU topology there, onnxruntime's cpuinfo crashes under qemu; without
# it, it prints "Error in cpuinfo" warnings and runs.
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# Local CAs of the host (a company proxy's, say) are trusted inside too, so pip reaches the registry.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null
fi
# A clean environment: the host's pip settings (find-links, constraints) name host paths.
inside() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

say "uname inside: $(inside uname -m)"
if [ ! -x "$ROOT/opt/venv/bin/pytest" ]; then
    say "venv with requirements.txt (+ pytest, hypothesis)"
    cp "$REPO/requirements.txt" "$ROOT/tmp/requirements.txt"
    inside python3 -m venv /opt/venv
    inside /opt/venv/bin/pip install -q --upgrade pip
    inside /opt/venv/bin/pip install -q -r /tmp/requirements.txt pytest hypothesis
fi

say "copying the checkout (tracked and new files, models/ without the raw .dat files)"
rm -rf "$ROOT/opt/facegate"
mkdir -p "$ROOT/opt/facegate"
(cd "$REPO" && { git ls-files -co --exclude-standard; find models -type f ! -name '*.dat'; } | sort -u |
    while read -r f; do [ -f "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) |
    tar -C "$ROOT/opt/facegate" -xf -

say "python and wheels inside"
inside /opt/venv/bin/python -c 'import platform, numpy, onnxruntime, cv2, cryptography; print(platform.machine(), "numpy", numpy.__version__, "onnxruntime", onnxruntime.__version__, "opencv", cv2.__version__, "cryptography", cryptography.__version__)'

say "edge tests: $TESTS"
existing=""
for t in $TESTS; do [ -f "$REPO/$t" ] && existing="$existing $t"; done
# shellcheck disable=SC2086  # word-splitting the test list is intended
inside /bin/sh -c "cd /opt/facegate && /opt/venv/bin/python -m pytest -q -p no:cacheprovider $existing"
