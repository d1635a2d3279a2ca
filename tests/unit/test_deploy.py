"""deploy/ and systemd/: the units (a lint that always runs, and `systemd-analyze verify` where it
exists), the installer in --dry-run, the USB enrollment script's refusals, shellcheck where it exists.

The lint parses the unit files as systemd does (sections, Key=Value, repeated keys accumulate) and
checks the keys the gate's safety depends on, so a CI without systemd still catches a dropped
WatchdogSec= or hardening line; `systemd-analyze verify` additionally catches unknown keys and bad
values, and is skipped with its reason where the binary is missing."""
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "facegate.service"
ARGUS_DROPIN = REPO / "systemd" / "facegate-argus-socket.conf"
INSTALLED_DROPIN = "/etc/systemd/system/facegate.service.d/argus-socket.conf"
BADGE_DROPIN = REPO / "systemd" / "facegate-badge-reader.conf"
INSTALLED_BADGE_DROPIN = "/etc/systemd/system/facegate.service.d/badge-reader.conf"
MQTT_DROPIN = REPO / "systemd" / "facegate-mqtt.conf"  # a template: the installer puts the broker's addresses in
INSTALLED_MQTT_DROPIN = "/etc/systemd/system/facegate.service.d/mqtt.conf"
OSDP_DROPIN = REPO / "systemd" / "facegate-osdp.conf"
INSTALLED_OSDP_DROPIN = "/etc/systemd/system/facegate.service.d/osdp.conf"
ENROLL_UNIT = REPO / "systemd" / "facegate-enroll@.service"
INSTALL = REPO / "deploy" / "install.sh"
ENROLL = REPO / "deploy" / "enroll-usb"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: not Key=Value inside a section: {raw!r}"
        key, value = (s.strip() for s in line.split("=", 1))
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"{path.name}:{n}: bad key {key!r}"
        current.setdefault(key, []).append(value)
    return sections


def one(section: dict, key: str) -> str:
    assert key in section, f"missing {key}="
    return section[key][-1]


def test_gate_unit_lint():
    u = parse_unit(UNIT)
    unit, svc = u["Unit"], u["Service"]
    assert one(svc, "Type") == "notify"
    assert one(svc, "ExecStart") == "/opt/facegate/venv/bin/python -m edge run --config /etc/facegate/config.yaml --quiet"
    assert one(svc, "WatchdogSec") == "10"
    # the watchdog's signal is one the gate turns into lock-and-exit, like systemctl stop's
    assert one(svc, "WatchdogSignal") == "SIGTERM" and int(one(svc, "TimeoutAbortSec")) > 0
    assert (one(svc, "Restart"), one(svc, "RestartSec")) == ("on-failure", "2")
    assert int(one(unit, "StartLimitIntervalSec")) > 0 and int(one(unit, "StartLimitBurst")) >= 1
    assert "StartLimitBurst" not in svc  # in [Service] systemd ignores it
    assert one(svc, "User") == "facegate" and set(one(svc, "SupplementaryGroups").split()) == {"gpio", "video"}
    expected = {"ProtectSystem": "strict", "ReadWritePaths": "/var/lib/facegate", "NoNewPrivileges": "yes",
                "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": "",
                "LoadCredential": "gallery.key:/etc/facegate/gallery.key", "PrivateDevices": "no"}
    assert {k: one(svc, k) for k in expected} == expected
    # ProtectClock= implies a device allow-list that would lock out /dev/gpiochip* and the camera
    assert "ProtectClock" not in svc and "DevicePolicy" not in svc
    assert one(u["Install"], "WantedBy") == "multi-user.target"


def test_argus_drop_in_binds_only_the_camera_sockets_into_the_private_tmp():
    d = parse_unit(ARGUS_DROPIN)
    assert set(d) == {"Unit", "Service"} and d["Unit"] == {"After": ["nvargus-daemon.service"]}
    # the sockets and nothing else: PrivateTmp= and the rest of the hardening stay as the unit has them
    assert d["Service"] == {"BindPaths": ["/tmp/argus_socket", "-/tmp/nvscsock"]}


def test_badge_drop_in_adds_the_input_group_and_nothing_else():
    """The reader's /dev/input node by group, as the unit reaches the camera and GPIO: no
    DeviceAllow=, whose allow-list would shut those out, and every other line as the unit has it."""
    d = parse_unit(BADGE_DROPIN)
    assert d == {"Service": {"SupplementaryGroups": ["input"]}}
    groups = [g for v in parse_unit(UNIT)["Service"]["SupplementaryGroups"] + d["Service"]["SupplementaryGroups"]
              for g in v.split()]  # a list setting: a drop-in's assignment adds to the unit's
    assert groups == ["gpio", "video", "input"]


def test_osdp_drop_in_adds_the_dialout_group_and_nothing_else():
    """The RS-485 adapter's tty by group, as the unit reaches the camera and GPIO: no DeviceAllow=,
    whose allow-list would shut those out (DevicePolicy=auto turns closed at the first one)."""
    d = parse_unit(OSDP_DROPIN)
    assert d == {"Service": {"SupplementaryGroups": ["dialout"]}}
    install = INSTALL.read_text()
    # the installer appends the key's credential, as the unit hands over the gallery key
    assert 'LoadCredential=osdp.scbk:$ETC/osdp.scbk' in install


def test_enroll_unit_lint():
    u = parse_unit(ENROLL_UNIT)
    svc = u["Service"]
    assert one(svc, "Type") == "oneshot"
    assert one(svc, "ExecStart") == "/opt/facegate/deploy/enroll-usb /dev/%I"
    assert one(u["Unit"], "BindsTo") == "dev-%i.device"  # pulling the stick stops the unit
    assert one(svc, "PrivateMounts") == "yes" and one(svc, "PrivateNetwork") == "yes"
    # enroll-usb writes the bundle sequence store in /etc/facegate as root (the gate user cannot)
    assert set(one(svc, "ReadWritePaths").split()) == {"/var/lib/facegate", "/etc/facegate"}
    assert "Install" not in u  # started by udev only
    # root with mount rights: the stick is the only device it may open, and no address family but AF_UNIX
    expected = {"NoNewPrivileges": "yes", "DevicePolicy": "closed", "DeviceAllow": "/dev/%I r",
                "RestrictAddressFamilies": "AF_UNIX", "RestrictNamespaces": "yes",
                "SystemCallFilter": "@system-service @mount", "SystemCallErrorNumber": "EPERM",
                "IPAddressDeny": "any", "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectProc": "invisible",
                "UMask": "0077"}
    assert {k: one(svc, k) for k in expected} == expected


def test_udev_rule_starts_the_template_for_fat_sticks_only():
    rule = (REPO / "deploy" / "99-facegate-enroll.rules").read_text()
    lines = [line for line in rule.splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1
    assert 'ENV{ID_BUS}=="usb"' in lines[0] and 'ENV{ID_FS_TYPE}=="vfat|exfat"' in lines[0]
    assert 'ENV{SYSTEMD_WANTS}+="facegate-enroll@%k.service"' in lines[0]
    assert "RUN" not in lines[0]  # udev starts a unit; it never runs a program itself


def mqtt_dropin(**mqtt) -> str | None:
    """The MQTT drop-in the installer writes for a config's mqtt section."""
    from edge.config import MqttConfig
    from edge.mqtt import systemd_dropin

    return systemd_dropin(MqttConfig(**{"enabled": True, "host": "192.0.2.10", **mqtt}), MQTT_DROPIN.read_text())


@pytest.mark.parametrize("dropin", [None, ARGUS_DROPIN, BADGE_DROPIN, MQTT_DROPIN, OSDP_DROPIN],
                         ids=["unit", "argus", "badge", "mqtt", "osdp"])
def test_systemd_analyze_verify(tmp_path, dropin):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd); the lint tests above still ran")
    # verify checks that ExecStart binaries exist: point them at ones that do on this machine
    for unit, old, new in ((UNIT, "/opt/facegate/venv/bin/python", sys.executable),
                           (ENROLL_UNIT, "/opt/facegate/deploy/enroll-usb", str(ENROLL))):
        text = unit.read_text()
        assert old in text
        (tmp_path / unit.name).write_text(text.replace(old, new))
    if dropin:  # read with the unit, as systemd reads /etc/systemd/system/facegate.service.d/
        (tmp_path / f"{UNIT.name}.d").mkdir()
        text = mqtt_dropin(username="gate", tls=True) if dropin == MQTT_DROPIN else dropin.read_text()
        if dropin == OSDP_DROPIN:  # as the installer writes it for a key left to systemd
            text += "LoadCredential=osdp.scbk:/etc/facegate/osdp.scbk\n"
        (tmp_path / f"{UNIT.name}.d" / dropin.name).write_text(text + "\nNotAKey=1\n")
    r = subprocess.run([exe, "verify", str(tmp_path / UNIT.name), str(tmp_path / ENROLL_UNIT.name)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "Failed to initialize" in r.stderr + r.stdout:
        pytest.skip(f"systemd-analyze cannot run here: {r.stderr.strip()[:200]}")
    # unknown keys and bad values are only warnings (exit 0): any output is a failure
    if dropin:  # the key planted in the drop-in shows that verify did read it
        assert r.returncode == 0 and f"{dropin.name}:" in r.stderr and "NotAKey" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    else:
        assert (r.returncode, r.stdout + r.stderr) == (0, "")


# `systemd-analyze security` exposure the enrollment unit reaches (10 = unrestricted); it runs as
# root to mount the stick, so User=, PrivateUsers=, PrivateDevices= and its capabilities stay exposed
ENROLL_EXPOSURE_MAX = 2.2


def test_enroll_unit_security_exposure(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd); the lint tests above still ran")
    # a template is scored as one of its instances, as udev starts it
    instance = tmp_path / "facegate-enroll@sda1.service"
    instance.write_text(ENROLL_UNIT.read_text())
    r = subprocess.run([exe, "security", "--offline=yes", str(instance)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "offline" in r.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline (systemd 250 or later can): "
                    f"{r.stderr.strip()[:200]}")
    found = re.search(r"Overall exposure level for facegate-enroll@sda1\.service: (\d+\.\d)", r.stdout)
    assert r.returncode == 0 and found, r.stdout + r.stderr
    assert float(found.group(1)) <= ENROLL_EXPOSURE_MAX, r.stdout


@pytest.mark.parametrize("script", [INSTALL, ENROLL, REPO / "deploy" / "aarch64-check.sh"])
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    r = subprocess.run([exe, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def dry_run(tmp_path, *args, model=None, tegra=False):
    sysroot = tmp_path / "sysroot"
    if model:
        (sysroot / "proc" / "device-tree").mkdir(parents=True)
        (sysroot / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\0")
    if tegra:
        (sysroot / "etc").mkdir(parents=True)
        (sysroot / "etc" / "nv_tegra_release").write_text("# R36 (release)\n")
    env = {**os.environ, "FACEGATE_SYSROOT": str(sysroot)}
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_install_dry_run_on_a_pi(tmp_path):
    out = dry_run(tmp_path, model="Raspberry Pi 5 Model B Rev 1.0")
    assert "== board: pi" in out
    assert re.search(r"apt-get install .*python3-venv.*python3-picamera2", out)
    assert "python3 -m venv --system-site-packages /opt/facegate/venv" in out
    assert "pip install --quiet --disable-pip-version-check -r /opt/facegate/app/requirements.txt" in out
    assert "usermod -a -G gpio,video facegate" in out
    assert "-m export setup" in out  # no --models: built in a temporary venv
    assert re.search(r"install -m 0644 \S+/yunet_int8.onnx \S+/yunet_int8.card.json /opt/facegate/models/", out)
    assert re.search(r"install -m 0644 \S+/yunet_fp32.onnx \S+/yunet_fp32.card.json /opt/facegate/models/", out)
    assert "detector: /opt/facegate/models/yunet_fp32.card.json" in out and "mode: passive" in out
    assert "source: picamera2" in out and "gallery: /var/lib/facegate/gallery.fgg" in out
    assert "audit: /var/lib/facegate/audit.sqlite3" in out and "pin_factory: default" in out
    assert "edge keygen --gallery '/etc/facegate/gallery.key'" in out and "chmod 0600 /etc/facegate/gallery.key" in out
    assert "facegate.service" in out and "99-facegate-enroll.rules /etc/udev/rules.d/" in out
    assert "systemctl enable facegate.service" in out
    assert "torch" not in out
    assert not re.search(r"apt-get install .*(gstreamer|python3-gi)", out)


def test_install_dry_run_on_a_jetson_with_prebuilt_models(tmp_path):
    out = dry_run(tmp_path, "--models", "/srv/models", tegra=True)
    assert "== board: jetson" in out
    assert re.search(r"apt-get install .*gstreamer1.0-tools.*gstreamer1.0-plugins-good", out)
    # the CSI camera through PyGObject, which comes from apt: the venv sees the system's packages
    assert re.search(r"apt-get install .*python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gstreamer1.0-plugins-base", out)
    assert "python3 -m venv --system-site-packages /opt/facegate/venv" in out
    assert "python3-picamera2" not in out
    assert "export setup" not in out
    assert "install -m 0644 /srv/models/sface_int8.onnx /srv/models/sface_int8.card.json /opt/facegate/models/" in out
    assert "install -m 0644 /srv/models/dlib_int8.onnx /srv/models/dlib_int8.card.json /opt/facegate/models/" in out
    assert "/srv/models/sface_dlib_int8.fusion.json /srv/models/sface_dlib_int8.fusion.card.json /opt/facegate/models/" in out
    assert "/srv/models/sface_dlib_fp32.fusion.json /srv/models/sface_dlib_fp32.fusion.card.json /opt/facegate/models/" in out
    assert "install -m 0644 /srv/models/dlib_fp32.onnx /srv/models/dlib_fp32.card.json /opt/facegate/models/" in out
    assert "encoder: /opt/facegate/models/sface_dlib_int8.fusion.card.json" in out
    assert "source: gstreamer" in out


@pytest.mark.parametrize("where, backend, chip, line", [
    ({"tegra": True}, "gpiod", "/dev/gpiochip0", 144),  # JetPack without a device-tree model: an Orin Nano's pin 7
    ({"model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"}, "gpiod", "/dev/gpiochip0", 144),
    ({"model": "NVIDIA Jetson AGX Orin Developer Kit", "tegra": True}, "gpiod", "/dev/gpiochip0", 106),
    ({"model": "Raspberry Pi 5 Model B Rev 1.0"}, "gpiozero", None, None),
])
def test_a_new_config_drives_header_pin_7_through_gpiod_on_a_jetson_and_gpio17_on_a_pi(tmp_path, where, backend,
                                                                                        chip, line):
    """The config the installer writes, loaded as the gate loads it: on a Jetson the relay is the
    Orin 40-pin table's pin 7 (README-deploy.md) on libgpiod, not the Raspberry Pi's GPIO17."""
    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps instead of writing one")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", platform.node().split(".")[0]):
        pytest.skip("this machine's name is no audience name, which the installer refuses")
    relay = written_config(dry_run(tmp_path, "--models", "/srv/models", **where), tmp_path).relay
    assert (relay.backend, relay.chip, relay.line) == (backend, chip, line)
    if backend == "gpiozero":
        assert (relay.pin, relay.pin_factory) == ("GPIO17", "default")
    readme = (REPO / "deploy" / "README-deploy.md").read_text()
    if line is not None:  # the offset is the table's for header pin 7 of that board
        board = "AGX Orin" if line == 106 else "Orin Nano, Orin NX"
        assert re.search(rf"^\| {board} \| 7 \| \S+ \| {line} \| tegra234-gpio \|$", readme, re.M)


@pytest.mark.parametrize("where,args,dropin", [
    ({"tegra": True}, [], True),  # the CSI camera, the Jetson's default
    ({"tegra": True}, ["--camera", "opencv"], False),  # a USB webcam on a Jetson
    ({"model": "Raspberry Pi 5 Model B Rev 1.0"}, [], False),
    ({}, ["--board", "generic"], False),
    ({}, ["--board", "generic", "--camera", "gstreamer"], True),  # its default pipeline is nvarguscamerasrc's
])
def test_the_argus_socket_drop_in_is_installed_only_for_the_csi_camera(tmp_path, where, args, dropin):
    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps and reads instead")
    out = dry_run(tmp_path, "--models", "/srv/models", *args, **where)
    installed = f"install -m 0644 {ARGUS_DROPIN} {INSTALLED_DROPIN}" in out
    assert installed is dropin
    assert (f"rm -f {INSTALLED_DROPIN}" in out) is not dropin  # one left by an earlier camera goes
    if dropin:  # ahead of the reload that reads it
        assert out.index(INSTALLED_DROPIN) < out.index("systemctl daemon-reload\n+ udevadm")


def run_installer_query(name: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    """The line of Python install.sh keeps as NAME_QUERY, run against `config` as the installer runs it."""
    query = re.search(rf"^{name}_QUERY='([^']+)'$", INSTALL.read_text(), re.M).group(1)
    return subprocess.run([sys.executable, "-c", query, str(config), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


@pytest.mark.parametrize("camera,needs", [
    ("source: gstreamer\n", "True"),
    ("source: gstreamer\n  pipeline: v4l2src ! videoconvert ! appsink name=sink\n", "False"),
    ("source: opencv\n  path: '0'\n", "False"),
])
def test_the_installers_argus_query_reads_the_config(tmp_path, camera, needs):
    """The one line of Python install.sh runs against a kept config to decide the drop-in."""
    (tmp_path / "config.yaml").write_text("camera:\n  " + camera)
    r = run_installer_query("ARGUS", tmp_path / "config.yaml")
    assert (r.returncode, r.stdout.strip()) == (0, needs), r.stderr


@pytest.mark.parametrize("badge,needs", [
    ("", "False"),
    ("badge: {mode: face_only}\n", "False"),
    ("badge: {mode: badge_and_face, device: /dev/input/by-id/usb-x-event-kbd}\n", "True"),
    ("badge: {mode: face_with_badge_fallback, device: /dev/input/by-id/usb-x-event-kbd}\n", "True"),
])
def test_the_installers_badge_query_reads_the_config(tmp_path, badge, needs):
    """The line of Python install.sh runs against a kept config to decide the badge reader's drop-in."""
    (tmp_path / "config.yaml").write_text("camera:\n  source: opencv\n" + badge)
    r = run_installer_query("BADGE", tmp_path / "config.yaml")
    assert (r.returncode, r.stdout.strip()) == (0, needs), r.stderr


def test_a_new_config_gets_no_badge_drop_in_and_one_left_behind_goes(tmp_path):
    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps and reads instead")
    out = dry_run(tmp_path, "--board", "generic")
    assert f"rm -f {INSTALLED_BADGE_DROPIN}" in out and f"{BADGE_DROPIN} {INSTALLED_BADGE_DROPIN}" not in out
    assert "groupadd --system input" not in out
    assert INSTALLED_BADGE_DROPIN in dry_run(tmp_path, "--uninstall")


def test_the_mqtt_drop_in_lets_the_service_reach_the_brokers_addresses_and_nothing_else(tmp_path):
    path = tmp_path / "mqtt.conf"
    path.write_text(mqtt_dropin())
    d = parse_unit(path)
    # the IP families, and the broker's address as the one exception to the unit's IPAddressDeny=any
    assert d == {"Service": {"RestrictAddressFamilies": ["AF_INET AF_INET6"], "IPAddressAllow": ["192.0.2.10"]}}
    unit = parse_unit(UNIT)["Service"]
    assert (one(unit, "IPAddressDeny"), one(unit, "RestrictAddressFamilies")) == ("any", "AF_UNIX AF_NETLINK")
    # secrets the config leaves to systemd come as the gallery key does
    path.write_text(mqtt_dropin(username="gate", tls=True, cert_file="/etc/facegate/mqtt.crt"))
    assert parse_unit(path)["Service"]["LoadCredential"] == ["mqtt.password:/etc/facegate/mqtt.password",
                                                             "mqtt.key:/etc/facegate/mqtt.key"]
    path.write_text(mqtt_dropin(username="gate", tls=True, password_file="/srv/pw", cert_file="/c", key_file="/k"))
    assert "LoadCredential" not in parse_unit(path)["Service"]
    assert mqtt_dropin(enabled=False, host=None) is None


def test_a_broker_name_is_resolved_at_install_and_one_that_does_not_resolve_is_refused(monkeypatch):
    import socket

    from edge.errors import ConfigError

    allowed = re.search(r"^IPAddressAllow=(.*)$", mqtt_dropin(host="localhost"), re.M).group(1).split()
    assert "127.0.0.1" in allowed and all(a in ("127.0.0.1", "::1") for a in allowed)

    def no_name(*a, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_name)
    with pytest.raises(ConfigError, match="mqtt.host 'broker.lan' does not resolve on this machine"):
        mqtt_dropin(host="broker.lan")


@pytest.mark.parametrize("mqtt,prints,status", [
    ("", "", 0),
    ("mqtt: {enabled: true, host: 192.0.2.10, port: 8883, tls: true}\n", "IPAddressAllow=192.0.2.10\n", 0),
    ("mqtt: {enabled: true, host: localhost, username: gate, password_file: PW}\n", "", 2),
])
def test_the_installers_mqtt_query_prints_the_drop_in_or_refuses(tmp_path, mqtt, prints, status):
    """The line of Python install.sh runs against the config to write the MQTT drop-in."""
    pw = tmp_path / "mqtt.password"
    pw.write_text("x\n")
    pw.chmod(0o644)
    (tmp_path / "config.yaml").write_text("camera:\n  source: opencv\n" + mqtt.replace("PW", str(pw)))
    r = run_installer_query("MQTT", tmp_path / "config.yaml", str(MQTT_DROPIN))
    assert r.returncode == status, r.stderr
    assert prints in r.stdout and (r.stdout == "") is (prints == "")
    if status:
        assert r.stderr.startswith(f"error: {pw}: mqtt password may be read or written by its group or others")


def test_a_new_config_gets_no_mqtt_drop_in_and_one_left_behind_goes(tmp_path):
    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps and reads instead")
    out = dry_run(tmp_path, "--board", "generic")
    assert f"rm -f {INSTALLED_MQTT_DROPIN}" in out and f"write {INSTALLED_MQTT_DROPIN}" not in out
    assert INSTALLED_MQTT_DROPIN in dry_run(tmp_path, "--uninstall")


def test_install_refuses_an_unknown_camera(tmp_path):
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", "--board", "generic", "--camera", "webcam"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unknown camera 'webcam'" in r.stderr


def written_config(out: str, tmp_path: Path):
    """The config.yaml a dry run would write, loaded as the gate loads it."""
    from edge.config import load_config

    lines = out.split("+ write /etc/facegate/config.yaml", 1)[1].splitlines()[1:]
    text = "\n".join(line[len("|   "):] for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("|"))])
    (tmp_path / "config.yaml").write_text(text + "\n")
    return load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize("args,names", [([], None), (["--audience", "hq-door-3,hq"], ["hq-door-3", "hq"])])
def test_a_new_config_answers_to_the_bundle_audience_given_or_the_host_name(tmp_path, args, names):
    """A freshly installed gate takes a signed bundle made for it and refuses one made for another."""
    from edge import bundle as B

    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps instead of writing one")
    host = platform.node().split(".")[0]
    if names is None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", host):
        pytest.skip(f"this machine's name {host!r} is no audience name; the installer refuses it (tested below)")
    cfg = written_config(dry_run(tmp_path, "--board", "generic", *args), tmp_path)
    assert cfg.enrollment.audience == (names or [host])
    priv, pub = B.generate_signing_key(tmp_path / "admin.key")
    (tmp_path / "m.yaml").write_text("sequence: 1\nremovals: [someone]\n")
    for audience, admitted in ((cfg.enrollment.audience[-1], True), ("another-gate", False)):
        out = tmp_path / f"bundle-{audience}"
        B.create_bundle(tmp_path, tmp_path / "m.yaml", B.load_private_key(priv), out, audience)
        if admitted:
            B.admit_bundle(out, B.load_public_key(pub), cfg.enrollment, time.time)
        else:
            with pytest.raises(B.BundleError, match="bundle is for audience 'another-gate'"):
                B.admit_bundle(out, B.load_public_key(pub), cfg.enrollment, time.time)


@pytest.mark.parametrize("audience", ["hq door", "-x", "a,,b", ",".join(f"g{i}" for i in range(17))])
def test_install_refuses_a_bad_audience_before_any_change(audience):
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", "--board", "generic", "--audience", audience],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "audience" in r.stderr, r.stderr
    assert "apt-get" not in r.stdout  # refused before the first step


@pytest.mark.parametrize("enrollment,prints", [("", ""), ("enrollment: {audience: [hq-door-3, hq]}\n", "hq-door-3 hq")])
def test_the_installers_audience_query_finds_a_kept_config_without_an_audience(tmp_path, enrollment, prints):
    """The line of Python install.sh runs against a kept config: empty output makes it warn."""
    (tmp_path / "config.yaml").write_text(OLD_INSTALLED_CONFIG + enrollment)
    r = run_installer_query("AUDIENCE", tmp_path / "config.yaml")
    assert (r.returncode, r.stdout.strip()) == (0, prints), r.stderr


def test_install_dry_run_changes_nothing(tmp_path):
    watched = [Path(p) for p in ("/opt/facegate", "/etc/facegate", "/var/lib/facegate",
                                 "/etc/systemd/system/facegate.service", "/etc/udev/rules.d/99-facegate-enroll.rules")]
    before = {p: p.exists() for p in watched}
    out = dry_run(tmp_path, "--board", "generic")
    assert "+ write /etc/facegate/config.yaml" in out or "keeping /etc/facegate/config.yaml" in out
    assert {p: p.exists() for p in watched} == before


def test_uninstall_dry_run_keeps_data_unless_purged(tmp_path):
    out = dry_run(tmp_path, "--uninstall")
    assert "systemctl disable --now facegate.service" in out and "rm -rf /opt/facegate" in out
    assert INSTALLED_DROPIN in out
    assert "rm -rf /etc/facegate /var/lib/facegate" not in out
    assert "rm -rf /etc/facegate /var/lib/facegate" in dry_run(tmp_path, "--uninstall", "--purge")


def test_install_rejects_unknown_options(tmp_path):
    r = subprocess.run(["bash", str(INSTALL), "--dry-run", "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr


@pytest.mark.parametrize("dev", ["/dev/../etc/passwd", "/dev/sdb1;reboot", "-o remount", "/dev/sd b1", "/dev/"])
def test_enroll_usb_refuses_odd_device_names(dev):
    r = subprocess.run(["bash", str(ENROLL), dev], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "refusing device name" in r.stderr


def test_enroll_usb_refuses_a_non_block_device():
    r = subprocess.run(["bash", str(ENROLL), "/dev/nullx9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "is not a block device" in r.stderr


def a_block_device() -> str:
    """A block device whose name the script accepts; the stubs below keep it from being touched."""
    for name in sorted(os.listdir("/dev")):
        path = f"/dev/{name}"
        if re.fullmatch(r"[a-z]+[0-9]*(p[0-9]+)?", name) and os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode):
            return path
    pytest.skip("no block device in /dev to hand the script")


STUBS = {
    "id": 'if [ "$*" = -u ]; then echo 0; else echo 1000; fi',
    "blkid": "echo vfat",
    "mount": 'mkdir "${!#}/facegate-bundle"',  # the stick holds a bundle folder
    "mountpoint": "exit 1",
    "umount": "exit 0",
    "chown": "exit 0",
    "install": "exit 0",
    "setpriv": 'exit "$APPLY_STATUS"',  # stands for `python -m edge bundle apply`
    "systemctl": 'echo "$*" >> "$SYSTEMCTL_LOG"; case $1 in is-active) exit "$SERVICE_ACTIVE";; esac',
}


@pytest.mark.parametrize("status,active,calls,says", [
    (0, 0, ["kill -s HUP --kill-who=main facegate.service"], "gallery updated; facegate.service told to reload"),
    (4, 0, ["kill -s HUP --kill-who=main facegate.service"], "some people refused (see above); facegate.service told"),
    (0, 3, ["reset-failed facegate.service", "start --no-block facegate.service"], "gallery updated; facegate.service started"),
    (2, 0, [], "bundle refused (status 2); gallery unchanged"),
    (5, 0, [], "cannot write its gallery or audit log (status 5)"),
    (1, 0, [], "bundle apply failed unexpectedly (status 1); facegate.service left as it is"),
])
def test_enroll_usb_reloads_the_gate_only_when_the_bundle_was_applied(tmp_path, status, active, calls, says):
    r, made, _ = run_enroll_usb(tmp_path, status, active)
    assert r.returncode == status, r.stderr
    assert says in r.stderr
    assert made == calls


def run_enroll_usb(tmp_path, status, active, advance=0):
    """enroll-usb on stub commands; `advance` is the status of the root `bundle advance-sequence`
    (the venv's python, run without setpriv). Returns the run, the systemctl calls, the python calls."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    python = tmp_path / "prefix" / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    log, pylog = tmp_path / "systemctl.log", tmp_path / "python.log"
    # run under `env -i`: what it needs is written into it, not passed in the environment
    python.write_text(f'#!/bin/bash\necho "$*" >> "{pylog}"\nexit {advance}\n')
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "RUNTIME_DIRECTORY": str(tmp_path),
           "FACEGATE_KEY": "/dev/null", "APPLY_STATUS": str(status), "SERVICE_ACTIVE": str(active),
           "SYSTEMCTL_LOG": str(log), "FACEGATE_PREFIX": str(tmp_path / "prefix")}
    r = subprocess.run(["bash", str(ENROLL), a_block_device()], capture_output=True, text=True, env=env, timeout=60)
    made = [c for c in (log.read_text().splitlines() if log.exists() else []) if not c.startswith("is-")]
    return r, made, pylog.read_text().splitlines() if pylog.exists() else []


@pytest.mark.parametrize("status,advance,expect", [(0, 0, 0), (4, 0, 4), (0, 1, 6), (4, 1, 6), (2, 0, 2), (5, 0, 5), (1, 0, 1)])
def test_enroll_usb_records_the_sequence_as_root_only_after_the_gallery_was_saved(tmp_path, status, advance, expect):
    r, made, python = run_enroll_usb(tmp_path, status, 0, advance)
    assert r.returncode == expect, r.stderr
    if status in (0, 4):  # setpriv (the gate user) ran apply; the store is written by root, straight after
        assert python == ["-m edge bundle advance-sequence --config /etc/facegate/config.yaml"]
        assert made == ["kill -s HUP --kill-who=main facegate.service"]  # the changed gallery is loaded either way
    else:
        assert python == [] and made == []
    assert ("sequence store NOT advanced (status 6)" in r.stderr) == (expect == 6)


# What the installer wrote before liveness was on by default: no liveness section, YuNet INT8.
OLD_INSTALLED_CONFIG = """\
camera:
  source: opencv
  path: "0"
models:
  detector: /opt/facegate/models/yunet_int8.card.json
  encoder: /opt/facegate/models/sface_dlib_int8.fusion.card.json
relay:
  pin: GPIO17
  pin_factory: default
storage:
  gallery: /var/lib/facegate/gallery.fgg
  audit: /var/lib/facegate/audit.sqlite3
  key_file: null
  retention_days: 1095
"""


def test_an_upgraded_gate_with_its_old_config_gets_the_shipped_liveness(tmp_path):
    from edge.config import load_config
    from edge.liveness import make_liveness
    from edge.pad import SHIPPED_PAD, PadPolicy

    (tmp_path / "config.yaml").write_text(OLD_INSTALLED_CONFIG)
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.liveness.mode == "passive" and cfg.models.liveness is None
    policy = make_liveness(cfg)
    assert isinstance(policy, PadPolicy) and policy.pad.card.name == "minifasnet_fusion"
    # the installer copies edge/ (PAD models included) to /opt/facegate/app: the card lives inside it
    assert SHIPPED_PAD.is_relative_to(REPO / "edge")


@pytest.mark.parametrize("door,says", [
    ("", "off"),
    ("door: {output: relay}\n", "off"),
    ("door: {output: osdp, osdp: {port: /dev/ttyUSB0}}\n", "on-credential"),
    ("door: {output: both, osdp: {port: /dev/ttyUSB0, scbk_file: /var/lib/facegate/osdp.scbk}}\n", "on"),
    ("door: {output: osdp, osdp: {port: /dev/ttyUSB0, secure: false}}\n", "on"),
])
def test_the_installers_osdp_query_reads_the_config(tmp_path, door, says):
    """The line of Python install.sh runs against a kept config to decide the OSDP drop-in and
    whether it hands the Secure Channel key over as a credential."""
    (tmp_path / "config.yaml").write_text("camera:\n  source: opencv\n" + door)
    r = run_installer_query("OSDP", tmp_path / "config.yaml")
    assert (r.returncode, r.stdout.strip()) == (0, says), r.stderr


def test_a_new_config_gets_no_osdp_drop_in_and_one_left_behind_goes(tmp_path):
    if Path("/etc/facegate/config.yaml").exists():
        pytest.skip("this machine has /etc/facegate/config.yaml, which a dry run keeps and reads instead")
    out = dry_run(tmp_path, "--board", "generic")
    assert f"rm -f {INSTALLED_OSDP_DROPIN}" in out and f"{OSDP_DROPIN} {INSTALLED_OSDP_DROPIN}" not in out
    assert "osdp.scbk" not in out
    assert INSTALLED_OSDP_DROPIN in dry_run(tmp_path, "--uninstall")
