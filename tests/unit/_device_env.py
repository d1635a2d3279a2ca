"""Run inside a venv made from requirements.txt alone (test_device_requirements.py builds it):
import every edge/ module, then a 5,000-person gallery search, which takes the INT8 path above
edge.search.MIN_ROWS. Prints one line per problem and exits 1 if there is any. Every module is
imported, none excluded: the evaluations, which need more than the device has, live in
evaluation/."""
from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

def check_imports() -> list[str]:
    import edge

    problems = []
    names = sorted(f"edge.{m.name}" for m in pkgutil.iter_modules(edge.__path__))
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - every failure is a finding, whatever its type
            problems.append(f"{name} does not import with requirements.txt alone: {type(e).__name__}: {e}\n"
                            + "".join(traceback.format_exception(e, limit=-3)))
    # the check must see this checkout's edge/, not a copy installed somewhere
    if Path(edge.__file__).resolve().parent != REPO / "edge" or "edge.pipeline" not in names:
        problems.append(f"edge/ not found in {REPO}: imported {edge.__file__}, modules {names}")
    return problems


def check_search(k: int = 5000, dim: int = 256) -> list[str]:
    import numpy as np

    from edge.match import identify
    from edge.search import MIN_ROWS, GalleryIndex

    assert k >= MIN_ROWS, "the search must take the INT8 path"
    rng = np.random.default_rng(0)
    m = rng.standard_normal((k, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    index = GalleryIndex(m)
    if index.session is None:
        return [f"a {k}-person gallery did not build the INT8 index"]
    names = [f"p{i}" for i in range(k)]
    problems = []
    for row in rng.integers(0, k, 20):
        q = m[row] + rng.normal(scale=0.5 / np.sqrt(dim), size=dim).astype(np.float32)
        q /= np.linalg.norm(q)
        got, want = identify(index.scores(q), names, 0.5), identify(m @ q, names, 0.5)
        if (got.identity, got.runner_up) != (want.identity, want.runner_up) or abs(got.score - want.score) > 1e-6:
            problems.append(f"search of p{row}: {got.identity}/{got.runner_up} {got.score:.6f}, "
                            f"float product {want.identity}/{want.runner_up} {want.score:.6f}")
    return problems


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    found = check_imports() + check_search()
    print("\n".join(found) if found else "ok")
    sys.exit(1 if found else 0)
