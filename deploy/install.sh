#!/bin/bash
# Install facegate on a Raspberry Pi (Raspberry Pi OS bookworm) or a Jetson (JetPack 6), as root,
# from a checkout of the repository. Idempotent: run it again to upgrade; config, keys, gallery and
# audit are kept.
#
#   sudo deploy/install.sh [--models DIR] [--public-key FILE] [--board pi|jetson|generic]
#                          [--camera picamera2|gstreamer|opencv] [--audience NAME[,NAME]] [--dry-run]
#   sudo deploy/install.sh --uninstall [--purge] [--dry-run]
#
#   --models DIR       copy prebuilt models (*_int8.onnx + cards) instead of building them here;
#                      needed on a Jetson, whose Python 3.10 cannot run the export
#   --public-key FILE  the admins' Ed25519 bundle public key (python -m edge keygen --signing ...)
#   --board B          skip detection (generic = any other Debian/Ubuntu box, USB camera)
#   --camera C         the camera a new config.yaml names, and the packages it needs (default:
#                      picamera2 on a Pi, gstreamer = the CSI camera on a Jetson, opencv = USB otherwise)
#   --audience NAMES   the names a new config.yaml answers to in a signed bundle (enrollment.audience;
#                      `bundle create --audience` must give one of them); default: this host's name
#   --dry-run          print every action, change nothing (needs no root)
#   --uninstall        stop and remove the service, units, udev rule and /opt/facegate;
#                      --purge also removes /etc/facegate, /var/lib/facegate (gallery, audit) and the user
#
# Layout: /opt/facegate/{app,venv,models,deploy}, /etc/facegate/{config.yaml,gallery.key,bundle.pub},
# /var/lib/facegate/{gallery.fgg,audit.sqlite3}, systemd/facegate.service and
# facegate-enroll@.service in /etc/systemd/system, the udev rule in /etc/udev/rules.d.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/facegate
ETC=/etc/facegate
VAR=/var/lib/facegate
UNITS=/etc/systemd/system
RULES=/etc/udev/rules.d
USER_NAME=facegate
# Only board detection reads through this, so tests can fake a Pi or a Jetson.
SYSROOT=${FACEGATE_SYSROOT:-}

dry=0 uninstall=0 purge=0 models="" pubkey="" board="" camera="" audience=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=1 ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        --models) models=${2:?--models needs a folder}; shift ;;
        --public-key) pubkey=${2:?--public-key needs a file}; shift ;;
        --board) board=${2:?--board needs pi, jetson or generic}; shift ;;
        --camera) camera=${2:?--camera needs picamera2, gstreamer or opencv}; shift ;;
        --audience) audience=${2:?--audience needs a name (or names, comma-separated)}; shift ;;
        -h | --help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '== %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
# Every change goes through run (a command) or put (a file), which --dry-run turns into a listing.
run() {
    if [ "$dry" = 1 ]; then
        printf '+ %s\n' "$*"
    else
        "$@"
    fi
}
put() { # put PATH MODE OWNER: file content from stdin
    if [ "$dry" = 1 ]; then
        printf '+ write %s (mode %s, owner %s)\n' "$1" "$2" "$3"
        sed 's/^/|   /'
    else
        install -m "$2" -o "${3%:*}" -g "${3#*:}" /dev/stdin "$1"
    fi
}

[ "$dry" = 1 ] || [ "$(id -u)" = 0 ] || die "run as root (or with --dry-run)"

model_says() { # the device tree's board name, e.g. "Raspberry Pi 5 Model B", "NVIDIA Jetson Orin Nano ..."
    [ -r "$SYSROOT/proc/device-tree/model" ] && tr -d '\0' <"$SYSROOT/proc/device-tree/model" | grep -q "$1"
}
detect_board() {
    if model_says "Raspberry Pi"; then
        echo pi
    elif [ -e "$SYSROOT/etc/nv_tegra_release" ] || model_says "Jetson"; then
        echo jetson
    else
        echo generic
    fi
}

uninstall() {
    say "uninstalling facegate"
    run systemctl disable --now facegate.service || true
    run rm -f "$UNITS/facegate.service" "$UNITS/facegate-enroll@.service" "$UNITS/facegate.service.d/argus-socket.conf" \
        "$UNITS/facegate.service.d/badge-reader.conf" "$UNITS/facegate.service.d/mqtt.conf" \
        "$UNITS/facegate.service.d/osdp.conf" \
        "$RULES/99-facegate-enroll.rules"
    run systemctl daemon-reload
    run udevadm control --reload
    run rm -rf "$PREFIX"
    if [ "$purge" = 1 ]; then
        say "purging config, keys, gallery, audit and the user"
        run rm -rf "$ETC" "$VAR"
        if id "$USER_NAME" >/dev/null 2>&1; then
            run userdel "$USER_NAME"
        fi
    else
        say "kept $ETC (config, keys) and $VAR (gallery, audit); --purge removes them"
    fi
}

if [ "$uninstall" = 1 ]; then
    uninstall
    exit 0
fi

board=${board:-$(detect_board)}
case $board in pi | jetson | generic) ;; *) die "unknown board '$board'" ;; esac
say "board: $board"
# requirements.txt's pins need Python 3.11 (Raspberry Pi OS bookworm); JetPack 6 has 3.10
requirements="requirements.txt"
if [ "$board" = jetson ]; then
    requirements="requirements-jetson.txt"
    # the export's venv is requirements.txt and more, so it cannot be made here: fail before changing anything
    [ -n "$models" ] || die "on a Jetson pass --models DIR: build the models on a machine with Python 3.11 (./dev setup writes models/)"
fi
say "device requirements: $requirements"
# The names a new config answers to in a signed bundle's audience: with none it refuses every bundle.
if [ -z "$audience" ]; then
    audience=$(uname -n)
    audience=${audience%%.*}
fi
IFS=, read -ra audience_names <<<"$audience"
[ ${#audience_names[@]} -le 16 ] || die "--audience: ${#audience_names[@]} names, at most 16"
for a in "${audience_names[@]}"; do
    # edge.config.AUDIENCE_NAME: checked here so that a bad name stops the installer before any change
    [[ $a =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] ||
        die "audience '$a': a name of letters, digits, '.', '_' and '-' (max 64, starting with a letter or digit); give one with --audience"
done
audience_yaml=$(printf '"%s", ' "${audience_names[@]}")
audience_yaml=${audience_yaml%, }
say "bundle audience: ${audience_names[*]}"

# ------------------------------------------------------------------ packages
packages=(python3 python3-venv util-linux)
venv_flags=()
case $board in
    pi) camera_source=${camera:-picamera2} ;;
    jetson)
        # nvarguscamerasrc and nvvidconv, the CSI camera's elements, come with JetPack
        packages+=(gstreamer1.0-tools gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)
        camera_source=${camera:-gstreamer}
        ;;
    generic) camera_source=${camera:-opencv} ;;
esac
case $camera_source in
    picamera2)
        # picamera2 comes from apt (it binds libcamera), so the venv sees the system packages.
        packages+=(python3-picamera2)
        venv_flags=(--system-site-packages)
        ;;
    gstreamer)
        # PyGObject and GStreamer's introspection data come from apt too (PyPI's pygobject builds
        # against the system's GLib), so the venv sees the system packages.
        packages+=(python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gstreamer1.0-plugins-base)
        venv_flags=(--system-site-packages)
        ;;
    opencv) ;;
    *) die "unknown camera '$camera_source' (picamera2, gstreamer or opencv)" ;;
esac
say "camera: $camera_source"
# The relay line a new config.yaml names: GPIO17 through gpiozero on a Pi (and any other box); on a
# Jetson header pin 7 through libgpiod, at its offset on the tegra234-gpio chip in NVIDIA's pin
# table (README-deploy.md, "Jetson Orin 40-pin header"), which is not checked on a board.
if [ "$board" = jetson ]; then
    relay_line=144 # Orin Nano, Orin NX: pin 7 is PAC.06
    if model_says "AGX Orin"; then
        relay_line=106 # AGX Orin: pin 7 is PQ.06
    fi
    relay_yaml="  backend: gpiod
  chip: /dev/gpiochip0   # tegra234-gpio in gpiodetect's list; another number there: change it
  line: $relay_line      # header pin 7 (README-deploy.md, Jetson Orin 40-pin header)"
    say "relay: gpiod, /dev/gpiochip0 line $relay_line (header pin 7)"
else
    relay_yaml="  pin: GPIO17
  pin_factory: default"
    say "relay: gpiozero, GPIO17"
fi
say "apt packages: ${packages[*]}"
run apt-get update
run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${packages[@]}"

# ------------------------------------------------------------------ user
for group in gpio video; do
    getent group "$group" >/dev/null || run groupadd --system "$group"
done
if ! id "$USER_NAME" >/dev/null 2>&1; then
    run useradd --system --user-group --home-dir "$VAR" --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi
run usermod -a -G gpio,video "$USER_NAME"

# ------------------------------------------------------------------ code and venv
grep -qiE '^(torch|tensorflow)' "$REPO/$requirements" && die "$requirements lists a training package; the device gets none"
run install -d -m 0755 "$PREFIX" "$PREFIX/deploy" "$PREFIX/models"
run rm -rf "$PREFIX/app.new"
run install -d -m 0755 "$PREFIX/app.new"
run cp -r "$REPO/edge" "$REPO/$requirements" "$PREFIX/app.new/"
run find "$PREFIX/app.new" -name __pycache__ -prune -exec rm -rf {} +
run rm -rf "$PREFIX/app"
run mv "$PREFIX/app.new" "$PREFIX/app"
run install -m 0755 "$REPO/deploy/enroll-usb" "$PREFIX/deploy/enroll-usb"
run install -m 0644 "$REPO/deploy/README-deploy.md" "$PREFIX/README-deploy.md"
# made again, packages kept, over a venv made before its camera needed the system's packages
if [ ! -x "$PREFIX/venv/bin/python" ] || { [ ${#venv_flags[@]} -gt 0 ] &&
    grep -qx "include-system-site-packages = false" "$PREFIX/venv/pyvenv.cfg"; }; then
    run python3 -m venv "${venv_flags[@]}" "$PREFIX/venv"
fi
run "$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check -r "$PREFIX/app/$requirements"

# ------------------------------------------------------------------ models
if [ -z "$models" ]; then
    # Built in a throwaway venv with the export requirements (onnx etc.), which the device keeps none of.
    say "building the models (python -m export setup) in a temporary venv"
    build=$(if [ "$dry" = 1 ]; then echo /tmp/facegate-build.DRYRUN; else mktemp -d /tmp/facegate-build.XXXXXX; fi)
    if [ "$dry" = 0 ]; then
        trap 'rm -rf "$build"' EXIT
    fi
    run cp -r "$REPO/edge" "$REPO/export" "$REPO/requirements.txt" "$REPO/requirements-export.txt" "$build/"
    run python3 -m venv "$build/venv"
    run "$build/venv/bin/pip" install --quiet --disable-pip-version-check -r "$build/requirements-export.txt"
    run sh -c "cd '$build' && ./venv/bin/python -m export setup"
    models=$build/models
fi
say "installing models from $models"
# The default encoder is the SFace + dlib fusion: its recipe, card and both member models; its fp32
# twin (recipe and fp32 members) is what enrollment embeds with (models.enroll_encoder). The
# default detector is YuNet fp32 (faster than its INT8 build); the INT8 one stays for configs
# written by older installers. The PAD (liveness) models travel inside the app, in edge/assets/pad.
for m in yunet sface dlib; do
    run install -m 0644 "$models/${m}_int8.onnx" "$models/${m}_int8.card.json" "$PREFIX/models/"
done
for m in yunet sface dlib; do
    run install -m 0644 "$models/${m}_fp32.onnx" "$models/${m}_fp32.card.json" "$PREFIX/models/"
done
for p in int8 fp32; do
    run install -m 0644 "$models/sface_dlib_$p.fusion.json" "$models/sface_dlib_$p.fusion.card.json" "$PREFIX/models/"
done

# ------------------------------------------------------------------ config, keys, data
run install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
run install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$VAR"
if [ ! -e "$ETC/config.yaml" ]; then
    put "$ETC/config.yaml" 0640 "root:$USER_NAME" <<EOF
# facegate gate config; every key: python -m edge check-config --describe
camera:
  source: $camera_source
  path: "0"          # opencv: device index or /dev/video*
  # pipeline: "v4l2src ! videoconvert ! appsink name=sink"   # gstreamer: another camera than the CSI one
models:
  detector: $PREFIX/models/yunet_fp32.card.json
  encoder: $PREFIX/models/sface_dlib_int8.fusion.card.json
liveness:
  mode: passive      # the shipped PAD model; "off" only where a second factor guards the door
relay:
$relay_yaml
storage:
  gallery: $VAR/gallery.fgg
  audit: $VAR/audit.sqlite3
  key_file: null     # the key comes from systemd (LoadCredential=gallery.key)
  retention_days: 1095
enrollment:
  audience: [$audience_yaml]   # a signed bundle applies only when made with one: bundle create --audience
EOF
else
    say "keeping $ETC/config.yaml"
fi
run sh -c "cd '$PREFIX/app' && '$PREFIX/venv/bin/python' -m edge check-config '$ETC/config.yaml' >/dev/null"
# A kept config written before bundles named an audience refuses every signed bundle. The installer
# never edits a kept config, so it says what to add.
AUDIENCE_QUERY='import sys; from edge.config import load_config; print(*load_config(sys.argv[1]).enrollment.audience)'
if [ -e "$ETC/config.yaml" ] && [ -x "$PREFIX/venv/bin/python" ] &&
    [ -z "$(cd "$REPO" && "$PREFIX/venv/bin/python" -c "$AUDIENCE_QUERY" "$ETC/config.yaml")" ]; then
    say "WARNING: $ETC/config.yaml names no enrollment.audience, so the gate refuses every signed bundle: add" \
        "'enrollment: {audience: [${audience_names[0]}]}' (README-deploy.md, section 4)"
fi
if [ ! -e "$ETC/gallery.key" ]; then
    run sh -c "umask 077 && cd '$PREFIX/app' && '$PREFIX/venv/bin/python' -m edge keygen --gallery '$ETC/gallery.key'"
fi
run chown root:root "$ETC/gallery.key"
run chmod 0600 "$ETC/gallery.key"
if [ -n "$pubkey" ]; then
    run install -m 0644 -o root -g root "$pubkey" "$ETC/bundle.pub"
elif [ ! -e "$ETC/bundle.pub" ]; then
    say "no $ETC/bundle.pub yet: USB enrollment refuses every bundle until it is installed (--public-key)"
fi

# ------------------------------------------------------------------ systemd and udev
# Prints True when the config's camera talks to nvargus-daemon (a Jetson CSI camera).
ARGUS_QUERY='import sys; from edge.camera import needs_argus_socket; from edge.config import load_config; print(needs_argus_socket(load_config(sys.argv[1]).camera))'
# config_app NAME: sets app, the code that reads $ETC/config.yaml with $PREFIX/venv (in a dry run
# the code that would be installed); fails, naming the drop-in NAME, when a dry run has no venv.
config_app() {
    app=$PREFIX/app
    if [ "$dry" = 1 ]; then
        app=$REPO  # nothing was installed: ask the code that would be
        if [ ! -x "$PREFIX/venv/bin/python" ]; then
            say "cannot read $ETC/config.yaml without $PREFIX/venv: the $1 drop-in is decided when run for real"
            return 1
        fi
    fi
}
# config_says QUERY NAME: whether the line of Python QUERY prints True for $ETC/config.yaml.
config_says() {
    config_app "$2" && [ "$(cd "$app" && "$PREFIX/venv/bin/python" -c "$1" "$ETC/config.yaml")" = True ]
}
camera_needs_argus() {
    if [ ! -e "$ETC/config.yaml" ]; then  # only in a dry run, which wrote none: the camera it would name
        [ "$camera_source" = gstreamer ]  # whose default pipeline is the CSI camera's
        return
    fi
    config_says "$ARGUS_QUERY" argus
}
# Prints True when the config reads a USB HID badge reader (badge.mode other than face_only).
BADGE_QUERY='import sys; from edge.config import load_config; print(load_config(sys.argv[1]).badge.mode != "face_only")'
badge_reader_configured() {
    # a dry run wrote no config, and the one it would write has no badge reader
    [ -e "$ETC/config.yaml" ] && config_says "$BADGE_QUERY" badge-reader
}
# Prints the MQTT drop-in for the config (systemd/facegate-mqtt.conf with the broker's addresses and
# the credentials the config leaves to systemd), nothing with mqtt.enabled off; a bad secret, a
# certificate that does not load or a broker name that does not resolve is one line and exit 2.
MQTT_QUERY='import sys; from edge.mqtt import print_dropin; sys.exit(print_dropin(*sys.argv[1:]))'
mqtt_dropin=""
if [ -e "$ETC/config.yaml" ] && config_app mqtt; then  # a dry run wrote no config, and the one it would write has MQTT off
    mqtt_dropin=$(cd "$app" && "$PREFIX/venv/bin/python" -c "$MQTT_QUERY" "$ETC/config.yaml" "$REPO/systemd/facegate-mqtt.conf") ||
        die "mqtt: the drop-in that lets the service reach the broker cannot be made (above); fix $ETC/config.yaml or set mqtt.enabled false"
fi
# Prints off when the config sends no OSDP card reads (door.output relay), else on, or on-credential
# when its Secure Channel key comes from systemd (door.osdp.secure with door.osdp.scbk_file null).
OSDP_QUERY='import sys; from edge.config import load_config; d = load_config(sys.argv[1]).door; print("off" if not d.sends_osdp else "on-credential" if d.osdp.secure and d.osdp.scbk_file is None else "on")'
osdp_mode=off
if [ -e "$ETC/config.yaml" ] && config_app osdp; then  # a dry run wrote no config, and the one it would write drives a relay
    osdp_mode=$(cd "$app" && "$PREFIX/venv/bin/python" -c "$OSDP_QUERY" "$ETC/config.yaml")
fi
if [ "$osdp_mode" = on-credential ]; then
    [ -e "$ETC/osdp.scbk" ] || die "door.osdp: the Secure Channel key is read from $ETC/osdp.scbk (LoadCredential=osdp.scbk)," \
        "which does not exist: write the panel's key for this reader there (32 hex digits), or pair in install mode" \
        "(README-deploy.md, OSDP)"
    run chown root:root "$ETC/osdp.scbk"
    run chmod 0600 "$ETC/osdp.scbk"
fi
run install -m 0644 "$REPO/systemd/facegate.service" "$REPO/systemd/facegate-enroll@.service" "$UNITS/"
# PrivateTmp= hides nvargus-daemon's socket in /tmp: the drop-in binds it in, for that camera only
if camera_needs_argus; then
    run install -d -m 0755 "$UNITS/facegate.service.d"
    run install -m 0644 "$REPO/systemd/facegate-argus-socket.conf" "$UNITS/facegate.service.d/argus-socket.conf"
else
    run rm -f "$UNITS/facegate.service.d/argus-socket.conf"
fi
# The reader is an input device, which the unit's groups do not reach: the input group, for it only
if badge_reader_configured; then
    if ! getent group input >/dev/null; then  # udev's rules give input devices this group once it exists
        run groupadd --system input
        run udevadm trigger --subsystem-match=input --action=change
    fi
    run install -d -m 0755 "$UNITS/facegate.service.d"
    run install -m 0644 "$REPO/systemd/facegate-badge-reader.conf" "$UNITS/facegate.service.d/badge-reader.conf"
else
    run rm -f "$UNITS/facegate.service.d/badge-reader.conf"
fi
# The RS-485 adapter is a serial port, which the unit's groups do not reach: the dialout group, for OSDP only
if [ "$osdp_mode" != off ]; then
    run install -d -m 0755 "$UNITS/facegate.service.d"
    if [ "$osdp_mode" = on-credential ]; then
        put "$UNITS/facegate.service.d/osdp.conf" 0644 root:root \
            <<<"$(cat "$REPO/systemd/facegate-osdp.conf")"$'\n'"LoadCredential=osdp.scbk:$ETC/osdp.scbk"
    else
        run install -m 0644 "$REPO/systemd/facegate-osdp.conf" "$UNITS/facegate.service.d/osdp.conf"
    fi
else
    run rm -f "$UNITS/facegate.service.d/osdp.conf"
fi
# The unit reaches no IP address; with MQTT on the drop-in lets it reach the broker's, and those only
if [ -n "$mqtt_dropin" ]; then
    run install -d -m 0755 "$UNITS/facegate.service.d"
    put "$UNITS/facegate.service.d/mqtt.conf" 0644 root:root <<<"$mqtt_dropin"
else
    run rm -f "$UNITS/facegate.service.d/mqtt.conf"
fi
run install -m 0644 "$REPO/deploy/99-facegate-enroll.rules" "$RULES/"
run systemctl daemon-reload
run udevadm control --reload
run systemctl enable facegate.service
if [ -e "$VAR/gallery.fgg" ]; then
    run systemctl restart facegate.service
else
    say "no gallery yet: the service starts after the first USB enrollment"
fi
say "done; logs: journalctl -u facegate -f"
