"""facegate command line: python -m edge COMMAND --help"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# The gate runs its stages on one thread by design (models.threads); a BLAS pool for the gallery
# search would only contend with it. Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import FacegateError, run_cli  # noqa: E402


def _cfg(args):
    from .config import load_config
    from .pipeline import resolve

    if getattr(args, "demo", False) or args.config is None and getattr(args, "default_demo", False):
        from .demo import demo_config

        return demo_config()
    cfg = load_config(args.config)
    return resolve(cfg, Path(args.config).resolve().parent) if args.config else cfg


def cmd_check_config(args) -> int:
    from .config import check_model_cards, describe, load_config

    if args.describe:
        print(describe())
        return 0
    cfg = load_config(args.file)
    check_model_cards(cfg, args.file)
    if cfg.mqtt.enabled:  # its secrets and certificates, read as the gate reads them
        from .mqtt import check_files

        check_files(cfg.mqtt)
    osdp = cfg.door.osdp
    if cfg.door.sends_osdp and osdp.secure and osdp.scbk_file:  # the key, read as the gate reads it
        from .osdp import read_scbk

        read_scbk(osdp.scbk_file, missing_ok=osdp.install_mode)
    print(f"{args.file}: OK")
    print(json.dumps(cfg.model_dump(), indent=2))
    return 0


def _ensure_demo_gallery(cfg, stack) -> None:
    """The demo enrolls its two sample people on first run (a real enrollment, same code path)."""
    from . import gallery as G
    from .demo import ENROLL, SAMPLES
    from .enroll import apply, embed_photo
    from .imageio import load_image

    if Path(cfg.storage.key_file).exists() and Path(cfg.storage.gallery).exists():
        try:
            G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file), stack.encoder.sha256)
            return
        except FacegateError:
            pass  # built with an older encoder: enroll again
    if not Path(cfg.storage.key_file).exists():
        G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    results = [embed_photo(stack, cfg.enroll_quality, load_image(SAMPLES / f), name, f) for name, f in ENROLL.items()]
    for r in results:
        print(f"demo enroll {r.name}: {r.reason}")
    apply(g, results, cfg.storage.retention_days)
    G.save(g, cfg.storage.gallery, G.load_key(cfg.storage.key_file))


def cmd_run(args) -> int:
    from .service import run_service

    cfg = _cfg(args)
    if args.demo:
        from .demo import describe
        from .pipeline import Stack

        print(describe())
        _ensure_demo_gallery(cfg, Stack.from_config(cfg))
    return run_service(cfg, max_frames=args.max_frames, verbose=not args.quiet)


def cmd_enroll(args) -> int:
    from . import gallery as G
    from .audit import AuditLog
    from .enroll import apply, enroll_folder, refuse_duplicates, screen_duplicates
    from .pipeline import Stack

    from .bundle import gallery_lock

    cfg = _cfg(args)
    stack = Stack.from_config(cfg)
    key = G.load_key(cfg.storage.key_file)
    results = enroll_folder(stack, cfg, Path(args.folder))
    # load-modify-save must not interleave with another writer
    with AuditLog(cfg.storage.audit) as audit, gallery_lock(cfg.storage.gallery):
        if Path(cfg.storage.gallery).exists():
            g = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
        else:
            g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
        try:
            now = audit.clock.enrolment_time(time.time())
        except FacegateError as e:
            audit.record_event("enroll", "clock_untrusted", details={"error": str(e)[:900]})
            raise
        duplicates = {d.name: d for d in screen_duplicates(stack, cfg.match, g, results, cfg.storage.retention_days, now)}
        if not args.allow_duplicate:
            results = refuse_duplicates(results, list(duplicates.values()))
        for r in results:
            print(f"{'OK     ' if r.ok else 'REFUSED'} {r.name}: {r.reason}  ({r.source})")
            if r.ok and r.name in duplicates:
                print(f"WARNING {r.name}: {duplicates[r.name].problem()}; enrolled as --allow-duplicate asks")
        n = apply(g, results, cfg.storage.retention_days, now=now)
        events = [("enroll", "enrolled", {"duplicate_of": duplicates[r.name].other} if r.name in duplicates else None,
                   {"identity": r.name}) for r in results if r.ok]
        events += [("enroll", "refused", {"why": r.reason[:900]}, {"identity": r.name})
                   for r in results if not r.ok and r.name in duplicates]
        if n:
            _save_audited(audit, "enroll", g, cfg.storage.gallery, key, events)
        elif events:
            audit.record_events(events)  # a duplicate refused is a security refusal: on record though nothing changed
    print(f"{n} enrolled, {len(results) - n} refused; gallery has {len(g)} people")
    return 0 if n == len(results) else 1


def cmd_forget(args) -> int:
    from . import gallery as G
    from .audit import AuditLog

    from .bundle import gallery_lock

    cfg = _cfg(args)
    key = G.load_key(cfg.storage.key_file)
    with AuditLog(cfg.storage.audit) as audit, gallery_lock(cfg.storage.gallery):
        g = G.load(cfg.storage.gallery, key)
        if not g.remove(args.name):
            print(f"{args.name}: not enrolled", file=sys.stderr)
            return 1
        _save_audited(audit, "forget", g, cfg.storage.gallery, key, [("forget", "removed", None, {"identity": args.name})])
    print(f"{args.name}: removed; gallery has {len(g)} people")
    return 0


def cmd_keygen(args) -> int:
    from . import gallery as G
    from .bundle import generate_signing_key
    from .errors import BundleError

    if not args.signing and not args.gallery:
        raise BundleError(None, "keygen needs --signing OUT and/or --gallery OUT")
    if args.signing:
        priv, pub = generate_signing_key(args.signing)
        print(f"signing key {priv} (keep it on the admin workstation), public key {pub} (install on each gate "
              f"as /etc/facegate/bundle.pub)")
    if args.gallery:
        if Path(args.gallery).exists():
            raise BundleError(args.gallery, "already exists; refusing to overwrite a key")
        G.new_key_file(args.gallery)
        print(f"gallery key {args.gallery} (0600)")
    return 0


def cmd_bundle(args) -> int:
    from .bundle import create_bundle, load_private_key, load_public_key, verify_bundle

    if args.action == "create":
        validity = {} if args.valid_days is None else {"valid_days": args.valid_days}
        m = create_bundle(args.photos, args.manifest, load_private_key(args.key), args.out, args.audience, **validity)
        print(f"{args.out}: bundle sequence {m.sequence} for {m.audience}, {len(m.people)} people, {len(m.removals)} "
              f"removal(s), signed; applies until {m.not_after}")
        return 0
    if args.action == "advance-sequence":
        return _bundle_advance_sequence(args)
    pub = load_public_key(args.public_key)
    if args.action == "verify":
        m = verify_bundle(args.bundle, pub).manifest
        scope = f"for {m.audience} until {m.not_after}" if m.version >= 2 else "version 1: any gate, no expiry"
        print(f"{args.bundle}: signature OK, sequence {m.sequence} ({scope}), {len(m.people)} people, "
              f"{len(m.removals)} removal(s)")
        return 0
    return _bundle_apply(args, pub)


# `bundle apply` exit statuses beyond run_cli's 2 (bundle refused) and 5 (the gate cannot write its
# gallery or audit log): deploy/enroll-usb reloads the gate on 0 and 4 only. 1 stays Python's own
# status for a crash, so a crash is never read as an applied bundle.
EXIT_PARTIAL = 4  # applied, some people refused


def _bundle_apply(args, pub) -> int:
    from contextlib import ExitStack

    from . import gallery as G
    from .audit import AuditLog
    from .bundle import admit_bundle, apply_bundle, gallery_lock, record_refusal
    from .pipeline import Stack

    cfg = _cfg(args)
    with AuditLog(cfg.storage.audit) as audit, ExitStack() as held:
        try:
            held.enter_context(gallery_lock(cfg.storage.gallery))
            # Signature, audience and expiry first: loading the models takes seconds on a Pi, and a
            # forged, foreign or expired stick is refused without them.
            bundle = admit_bundle(args.bundle, pub, cfg.enrollment, lambda: audit.clock.enrolment_time(time.time()))
            stack = Stack.from_config(cfg)
            key = G.load_key(cfg.storage.key_file)
            if Path(cfg.storage.gallery).exists():
                g = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
            else:
                g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
        except FacegateError as e:
            record_refusal(audit, args.bundle, e)
            raise
        report = apply_bundle(bundle, g, stack, cfg, audit=audit, key=key)  # audits its own outcome
    for name in report.enrolled:
        print(f"OK      {name}")
    for name, why in report.refused.items():
        print(f"REFUSED {name}: {why}")
    for name in report.removed:
        print(f"REMOVED {name}")
    print(f"bundle {report.sequence} applied: {len(report.enrolled)} enrolled, {len(report.refused)} refused, "
          f"{len(report.removed)} removed; gallery has {len(g)} people")
    return 0 if not report.refused else EXIT_PARTIAL


def _bundle_advance_sequence(args) -> int:
    """Root's half of `bundle apply` on a gate: the gate user cannot write the sequence store, so
    deploy/enroll-usb runs this as root once apply reports the gallery saved. No audit log is
    opened here: root would leave root-owned journal files the gate user then cannot write; the
    apply's own rows already record the sequence, and enroll-usb logs this step to the journal."""
    from . import gallery as G
    from .bundle import advance_sequence, sequence_path

    cfg = _cfg(args)
    # no gallery lock: the gallery is replaced by rename, so a read sees one whole version
    g = G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    before, after = advance_sequence(cfg.storage, g.bundle_sequence)
    print(f"{sequence_path(cfg.storage)}: bundle sequence {before} -> {after}")
    return 0


def cmd_rekey(args) -> int:
    from . import gallery as G
    from .audit import AuditLog
    from .bundle import gallery_lock

    cfg = _cfg(args)
    path = args.gallery or cfg.storage.gallery
    old, new = G.load_key(args.old), G.load_key(args.new)
    with AuditLog(cfg.storage.audit) as audit, gallery_lock(path):
        g = G.load(path, old)
        _save_audited(audit, "gallery", g, path, new, [("gallery", "rekeyed", {"people": len(g)}, {})])
    print(f"{path}: re-encrypted with {args.new} ({len(g)} people); install it as the gallery key and restart the service")
    return 0


def cmd_trust_clock(args) -> int:
    from .audit import AuditLog
    from .bundle import iso

    cfg = _cfg(args)
    with AuditLog(cfg.storage.audit) as audit:
        before = audit.clock.floor
        audit.trust_clock()
    print(f"time floor moved from {iso(before)} to {iso(time.time())} (audited); restart the gate to use it")
    return 0


def _save_audited(audit, kind: str, g, path, key: bytes, events: list) -> None:
    """edge.bundle.save_audited, with a gallery that cannot be written audited as the change's failure."""
    from .bundle import save_audited
    from .errors import AuditError, StorageError

    try:
        save_audited(g, path, key, audit, events)
    except AuditError:
        raise  # nothing changed, and the audit log takes no row to say so
    except StorageError as e:
        audit.record_event(kind, "not_saved", details={"error": str(e)[:900]})
        raise


def _probe(args):
    """The probe photo's embedding and the gallery's matcher, as the gate would search it."""
    from . import gallery as G
    from .enroll import embed_photo
    from .imageio import load_image
    from .pipeline import Matcher, Stack

    cfg = _cfg(args)
    stack = Stack.from_config(cfg)
    g = G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file), stack.encoder.sha256)
    r = embed_photo(stack, cfg.quality, load_image(args.image), "probe", args.image, probe=True)
    return r, Matcher(cfg.match, stack, g)


def cmd_calibration(args) -> int:
    """The operating points the gate would take with this config and gallery, and where they come from."""
    from . import gallery as G
    from .pipeline import Matcher, Stack
    from .threshold import check_operating_point

    cfg = _cfg(args)
    stack = Stack.from_config(cfg)
    g = G.load(cfg.storage.gallery, G.load_key(cfg.storage.key_file), stack.encoder.sha256)
    m = Matcher(cfg.match, stack, g)
    out, refused = {}, False
    for name, point in (("identification (1:N)", m.point()), ("verification (1:1, badge claim)", m.point(True))):
        out[name] = point.describe()
        try:
            check_operating_point(point, cfg.match.threshold is not None)
        except FacegateError as e:
            out[name]["refused"], refused = str(e), True
    print(json.dumps({"gallery": str(cfg.storage.gallery), "people": len(g), "target_fpir": cfg.match.target_fpir,
                      "calibration": cfg.match.calibration, **out}, indent=2))
    return 1 if refused else 0


def cmd_identify(args) -> int:
    r, matcher = _probe(args)
    if not r.ok:
        print(f"{args.image}: {r.reason}")
        return 2
    m = matcher.match(r.embedding)
    print(json.dumps({"identity": m.identity if m.accepted else None, "nearest": m.identity, "score": round(m.score, 4),
                      "runner_up": m.runner_up, "runner_up_score": round(m.runner_up_score, 4) if m.runner_up else None,
                      "threshold": round(m.threshold, 4), "reason": m.reason}))
    return 0 if m.accepted else 1


def _claimed_name(g, claim: str) -> str:
    """The enrolled name a claim (a name or a badge id) stands for; the claim itself when no one
    holds it. A claim that is one person's name and another's id, or an id two people share, is
    refused: checking the face against either could verify the wrong person."""
    hits = [p for p in g.people if claim in (p.name, p.person_id)]
    if len(hits) > 1:
        who = ", ".join(f"{p.name} (id {p.person_id or 'none'})" for p in hits)
        raise FacegateError(None, f"claim {claim!r} is ambiguous: it matches {who}; claim by an id only one of "
                                  f"them holds")
    return hits[0].name if hits else claim


def cmd_verify(args) -> int:
    r, matcher = _probe(args)
    if not r.ok:
        print(f"{args.image}: {r.reason}")
        return 2
    name = _claimed_name(matcher.gallery, args.as_name)
    m = matcher.match(r.embedding, claim=name)
    print(json.dumps({"claim": args.as_name, "identity": name, "verified": m.accepted,
                      "score": round(m.score, 4) if m.score > -1e9 else None,
                      "threshold": round(m.threshold, 4), "reason": m.reason}))
    return 0 if m.accepted else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge", description="facegate: face-recognition door gate")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", "-c", help="config YAML (default: built-in defaults)")
        s.set_defaults(fn=fn)
        return s

    s = add("run", cmd_run, "run the gate loop (camera -> relay + audit)")
    s.add_argument("--demo", action="store_true", help="the embedded demo: replayed sample faces, mock GPIO")
    s.add_argument("--max-frames", type=int, default=None)
    s.add_argument("--quiet", action="store_true")
    s = add("enroll", cmd_enroll, "enroll one photo per person from a folder (file name = person)")
    s.add_argument("folder")
    s.add_argument("--allow-duplicate", action="store_true",
                   help="enroll a face the gate would take for another enrolled person (twins), with a warning; "
                        "without it such a person is refused")
    s = add("verify", cmd_verify, "1:1: does IMAGE show the claimed person?")
    s.add_argument("image")
    s.add_argument("--as", dest="as_name", required=True, help="claimed identity (name or badge id)")
    s = add("identify", cmd_identify, "1:N: who in the gallery does IMAGE show?")
    s.add_argument("image")
    s = add("forget", cmd_forget, "remove a person from the gallery")
    s.add_argument("name")
    s = add("keygen", cmd_keygen, "make keys: Ed25519 bundle signing key pair and/or a gallery key")
    s.add_argument("--signing", metavar="OUT", help="private key PEM (0600) at OUT, public key at OUT with suffix .pub")
    s.add_argument("--gallery", metavar="OUT", help="32-byte gallery key file (0600)")
    s = add("bundle", cmd_bundle, "signed enrollment bundles: create (workstation), verify, apply (gate)")
    bsub = s.add_subparsers(dest="action", required=True)
    b = bsub.add_parser("create", help="photos + manifest.yaml -> signed bundle folder")
    b.add_argument("--photos", required=True, help="folder with the photos the manifest names")
    b.add_argument("--manifest", required=True, help="manifest.yaml: sequence, created, people, removals")
    b.add_argument("--key", required=True, help="Ed25519 signing key (PEM)")
    b.add_argument("--out", required=True, help="bundle folder to write (must not exist)")
    b.add_argument("--audience", required=True, help="the gate or site it is for: a name in that gate's enrollment.audience")
    b.add_argument("--valid-days", type=float, default=None,
                   help="the gate refuses it once this many days from now have passed (default 7)")
    for action, help_ in (("verify", "check a bundle's signature and photos"),
                          ("apply", "verify, quality-gate and apply a bundle to the gallery")):
        b = bsub.add_parser(action, help=help_)
        b.add_argument("bundle", help="bundle folder")
        b.add_argument("--public-key", default="/etc/facegate/bundle.pub", help="Ed25519 public key (PEM)")
        # SUPPRESS: an absent --config here must not overwrite one given before the action
        b.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config YAML (default: built-in defaults)")
    b = bsub.add_parser("advance-sequence", help="as root: record the gallery's applied bundle sequence in "
                                                 "storage.sequence_file (deploy/enroll-usb runs it after apply)")
    b.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config YAML (default: built-in defaults)")
    s = add("rekey", cmd_rekey, "re-encrypt the gallery with a new key")
    s.add_argument("--old", required=True, help="current gallery key file")
    s.add_argument("--new", required=True, help="new gallery key file (python -m edge keygen --gallery NEW)")
    s.add_argument("--gallery", help="gallery file (default: storage.gallery from the config)")
    add("trust-clock", cmd_trust_clock, "vouch for the wall clock: it becomes the time floor that expiry is judged "
                                        "against (after a clock refused as too far ahead, once it is known right)")
    add("calibration", cmd_calibration, "the threshold the gate takes for its gallery, the FPIR it expects, and "
                                        "where that comes from (1:N and 1:1)")
    s = add("check-config", cmd_check_config, "validate a config file and print it")
    s.add_argument("file", nargs="?")
    s.add_argument("--describe", action="store_true", help="list every field with bounds and meaning")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "check-config" and not args.file and not args.describe:
        p.error("check-config needs FILE or --describe")
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
