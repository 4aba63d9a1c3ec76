"""One check shared by the tests that compare two runs (resumed vs whole, K runs in one process vs alone):
their train.csv and eval.csv rows are identical in every column but wall_time, and their final weights are
equal, bit for bit or within a given tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def log_rows(run: Path, name: str) -> list[list[str]]:
    """The rows of the run's CSV ``name`` (header included), without the wall_time column."""
    lines = (run / name).read_text().splitlines()
    assert len(lines) > 1, f"{run / name} has no rows: the test would compare nothing"
    keep = [i for i, h in enumerate(lines[0].split(",")) if h != "wall_time"]
    return [[line.split(",")[i] for i in keep] for line in lines]


def assert_same_run(a: Path, b: Path, tolerance: dict | None = None) -> None:
    """Runs ``a`` and ``b`` logged the same rows and ended with the same weights: bit for bit, or within
    ``tolerance`` (keyword arguments of numpy.testing.assert_allclose)."""
    for name in ("train.csv", "eval.csv"):
        assert log_rows(a, name) == log_rows(b, name), f"{name} of {a} and {b} differ"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        if tolerance is None:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{a} vs {b}: {key}")
        else:
            np.testing.assert_allclose(wa[key], wb[key], err_msg=f"{a} vs {b}: {key}", **tolerance)
