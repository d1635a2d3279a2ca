"""Longer fuzz runs of tests/reliability/test_fuzz.py (image loader, gallery, bundle and config
parsers): `python -m reliability.fuzz --examples 20000` runs that many cases per target and
prints hypothesis' statistics; any exception other than the parser's own error is a failure."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from reliability.common import REPO


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=20000, help="cases per target")
    args = p.parse_args(argv)
    env = dict(os.environ, FACEGATE_FUZZ_EXAMPLES=str(args.examples))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
                            "tests/reliability/test_fuzz.py", "-k", "fuzz_"], cwd=REPO, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
