"""One exception family, so the CLI and the service can report bad input by file and problem."""
from __future__ import annotations

from pathlib import Path


class FacegateError(Exception):
    """A problem the user can fix: names the file (if any) and what is wrong with it."""

    exit_status = 2  # the command line's status for it: bad input, nothing changed

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ModelError(FacegateError):
    pass


class GalleryError(FacegateError):
    pass


class ConfigError(FacegateError):
    pass


class ImageError(FacegateError):
    pass


class BundleError(FacegateError):
    pass


class StorageError(FacegateError):
    """The gate cannot write its own state (gallery, lock file, audit log): a full, read-only or
    failing disk, not bad input. Its own exit status, so a script can tell the two apart."""

    exit_status = 5


class AuditError(StorageError):
    pass


class CameraError(FacegateError):
    pass


def run_cli(fn, args) -> int:
    """Run a CLI command: a FacegateError is the user's to fix, so it becomes one clear line on
    stderr and its exit status (2, or 5 for storage the gate cannot write), not a traceback."""
    import sys

    try:
        return fn(args)
    except FacegateError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status


def lazy_command(package: str, module: str):
    """A CLI subcommand whose module (and its heavy imports) loads only when it runs: building the
    parser imports nothing else. The module's `main(args)` runs it."""
    def run(args) -> int:
        import importlib

        return importlib.import_module(f".{module}", package).main(args)

    return run
