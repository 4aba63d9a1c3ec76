"""numba, where it is installed and works: the few loops that NumPy and torch do slowly (the in-process env's
screens, dqn_atari.envs.screens; the replay's channels-last batches, dqn_atari.replay.ring). Each caller keeps a
plain NumPy or library path for machines without numba, with the same results."""

from __future__ import annotations

import warnings
from typing import Callable

try:
    import numba
except (ImportError, OSError):  # a dependency, but a machine without it (or with a broken llvmlite) still works
    numba = None


def compiled(function):
    """Compiled by numba at first use, without fast-math: no reordering, no fused multiply-add. The machine code
    is cached on disk where numba finds a writable place for it (else it compiles at each start, ~2 s). Without
    numba: ``function`` itself."""
    if numba is None:
        return function
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install, no home)
        return numba.njit(nogil=True)(function)


def kernel_works(check: Callable[[], bool], where: str, fallback: str) -> bool:
    """Whether a compiled kernel can be used here: numba is installed, and ``check()`` (which runs the kernel on a
    small input and compares it with the plain path) compiles, runs and returns True. A kernel that fails to
    compile or run warns, naming ``where`` and the ``fallback`` used instead; one that runs but disagrees is
    ``check``'s to report (AreaResize's warns; the ring's falls back quietly)."""
    if numba is None:
        return False
    try:
        return bool(check())
    except Exception as error:  # numba that cannot compile here: the plain path, a little slower
        warnings.warn(f"{where}: numba failed ({type(error).__name__}: {error}); using {fallback}.")
        return False
