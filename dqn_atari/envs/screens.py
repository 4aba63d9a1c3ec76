"""The in-process backend's screen work, compiled: ALE's grayscale screen, and the max-pool and area resize.

The in-process backend (:mod:`dqn_atari.envs.emulators`) reads two grayscale screens per agent step and pools
and resizes them to one 84x84 frame. Both are done here faster than by the libraries, with the same pixels.

**Grayscale** (:class:`PaletteGrayscale`). ALE's ``getScreenGrayscale`` maps each pixel's palette index
through the console's grayscale palette (~9 us for a 210x160 screen). ``getScreen`` copies the indices
alone (~0.3 us), and a compiled lookup in a table of that palette, two pixels at a time, takes ~4 us. The
table is learnt from ALE itself: where the screen holds an index the table lacks, that screen is taken from
``getScreenGrayscale`` and its colours are added to the table. The grayscale value of an index is a fixed
function of the index (the palette of the ROM), so the result is ALE's screen, bit for bit; no palette is
copied here.

**Area resize** (:class:`AreaResize`). ``cv2.resize(..., interpolation=cv2.INTER_AREA)`` spends ~37 us of a
~300 us step (2-core VM): for ratios that are not whole numbers (210/84 = 2.5, 160/84 = 40/21) OpenCV walks
a table of (destination, source, weight) entries one pixel at a time. :class:`AreaResize` does the same
float32 arithmetic in about 9 us, pooling included.

What OpenCV computes (``modules/imgproc/src/resize.cpp``: ``computeResizeAreaTab`` builds the tables,
``ResizeArea_Invoker`` applies them): along each axis, output cell ``d`` covers source coordinates
``[d * scale, (d + 1) * scale)`` with ``scale = 1 / (dsize / ssize)``; each source pixel it overlaps is a tap
weighted by the overlap over the cell width, in float32 (:func:`area_taps`). A source row's horizontal sums
are ``(s[i0] * a0 + s[i1] * a1) + s[i2] * a2``, taps in source order; an output pixel is
``(b0 * row0 + b1 * row1) + b2 * row2`` over those sums, rounded half to even and saturated to 0..255.

Here the same operations, in the same order per pixel, are laid out so that the compiler vectorizes them: the
horizontal pass runs over the transposed screen (one tap is a whole contiguous column of 210 values), and the
vertical pass over the sums transposed back. Padding taps have weight 0 and add +0.0, which changes no sum.
Numba compiles without fast-math, so no fused multiply-add or reordering changes a bit. ``tests/test_envs.py``
compares it with ``cv2.resize`` on random images and real screens; ratios OpenCV handles differently
(enlarging, or whole-number ratios on both axes) go to ``cv2.resize`` itself, as does everything where numba
is not installed or cannot compile. Each :class:`AreaResize` also checks itself against ``cv2.resize`` when
it is made, and uses ``cv2.resize`` (with a warning) if a pixel differs: an OpenCV build that fuses its
multiply-adds (another processor, a later release) must not change the observations.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import cv2  # opencv-python-headless: ale-py's C++ env resizes with its own OpenCV
import numpy as np

from dqn_atari.jit import compiled, kernel_works, numba


def area_taps(source: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's area-resize taps for one axis shrunk from ``source`` to ``size`` pixels.

    Returns ``(index, weight)``, both of shape ``(size, taps)``: output pixel ``d`` is the sum over ``t`` of
    ``pixel[index[d, t]] * weight[d, t]`` in order of ``t``. Cells with fewer taps are padded with weight 0.
    """
    scale = 1.0 / (size / source)  # as OpenCV: the inverse of the inverse scale
    cells: list[list[tuple[int, np.float32]]] = []
    for d in range(size):
        start = d * scale
        end = start + scale
        width = min(scale, source - start)
        first = min(math.ceil(start), source - 1, math.floor(end))
        last = min(math.floor(end), source - 1)
        taps = []
        if first - start > 1e-3:  # the part of the pixel before the first whole one
            taps.append((first - 1, np.float32((first - start) / width)))
        taps += [(s, np.float32(1.0 / width)) for s in range(first, last)]
        if end - last > 1e-3:  # the part of the last pixel
            taps.append((last, np.float32(min(end - last, 1.0, width) / width)))
        cells.append(taps)
    count = max(len(taps) for taps in cells)
    index = np.zeros((size, count), np.int64)
    weight = np.zeros((size, count), np.float32)
    for d, taps in enumerate(cells):
        padded = taps + [(taps[-1][0], np.float32(0.0))] * (count - len(taps))
        index[d], weight[d] = zip(*padded)
    return index, weight


@compiled
def _weighted_rows(rows: np.ndarray, index: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """``out[d] = rows[index[d, 0]] * weight[d, 0] + rows[index[d, 1]] * weight[d, 1] + ...``, left to right."""
    for d in range(out.shape[0]):
        acc = out[d]
        source, w = rows[index[d, 0]], weight[d, 0]
        for j in range(acc.shape[0]):
            acc[j] = np.float32(source[j]) * w
        for t in range(1, index.shape[1]):
            source, w = rows[index[d, t]], weight[d, t]
            for j in range(acc.shape[0]):
                acc[j] += np.float32(source[j]) * w


@compiled
def _round_to_uint8(values: np.ndarray, out: np.ndarray) -> None:
    """OpenCV's ``saturate_cast<uchar>(float)`` of non-negative values: round half to even, at most 255."""
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[i, j] = np.uint8(min(np.rint(values[i, j]), np.float32(255.0)))


@compiled
def _palette_lookup(indices: np.ndarray, pair_table: np.ndarray, out: np.ndarray) -> bool:
    """``out = table[indices]`` two pixels at a time, for C-contiguous uint8 screens of an even number of pixels:
    ``pair_table[a | b << 8] = table[a] | table[b] << 8``. False if a pair has no entry (-1) yet."""
    source, target = indices.ravel().view(np.uint16), out.ravel().view(np.uint16)
    seen = np.int32(0)
    for i in range(source.shape[0]):
        value = pair_table[source[i]]
        seen |= value  # stays within 0..65535 unless a value is -1
        target[i] = value
    return seen >= 0


class PaletteGrayscale:
    """ALE's grayscale screen through a palette table learnt from ALE itself (module docstring); one table
    can serve every emulator of one ROM."""

    def __init__(self, height: int, width: int):
        self.table = np.full(256, -1, np.int16)  # grayscale value of each palette index; -1: not seen yet
        self._pairs = np.full(1 << 16, -1, np.int32)  # the table for two pixels at a time (_palette_lookup)
        self._indices = np.empty((height, width), np.uint8)
        self.compiled = height * width % 2 == 0 and kernel_works(self._runs, "dqn_atari.envs.screens",
                                                                 "ALE's getScreenGrayscale")

    def _runs(self) -> bool:
        _palette_lookup(np.zeros((1, 2), np.uint8), self._pairs, np.empty((1, 2), np.uint8))  # False: not learnt yet
        return True

    def __call__(self, ale: Any, out: np.ndarray) -> None:
        """Write ``ale``'s current grayscale screen into ``out`` (uint8, the screen's shape, C-contiguous)."""
        if not self.compiled:
            ale.getScreenGrayscale(out)
            return
        if out.shape != self._indices.shape or not out.flags.c_contiguous:  # compiled code does not check bounds
            raise ValueError(f"PaletteGrayscale: expected a C-contiguous output of shape {self._indices.shape}")
        ale.getScreen(self._indices)
        if not _palette_lookup(self._indices, self._pairs, out):
            ale.getScreenGrayscale(out)  # a colour not seen yet: ALE's screen, and its colours for the table
            self.learn(self._indices, out)

    def learn(self, indices: np.ndarray, grayscale: np.ndarray) -> None:
        """Add the colours of a screen (its palette indices and ALE's grayscale of it) to the tables."""
        self.table[indices] = grayscale
        pair = np.arange(1 << 16)
        low, high = self.table[pair & 255].astype(np.int32), self.table[pair >> 8].astype(np.int32)
        self._pairs[:] = np.where((low >= 0) & (high >= 0), low | high << 8, -1)


class AreaResize:
    """Pool two ``(height, width)`` uint8 screens and resize to ``(size, size)`` as OpenCV's INTER_AREA."""

    def __init__(self, height: int, width: int, size: int):
        self.size = size
        self._shapes = ((height, width), (size, size))
        scale_y, scale_x = 1.0 / (size / height), 1.0 / (size / width)
        # OpenCV's general area path: shrinking on both axes, not by whole numbers on both.
        general = min(scale_x, scale_y) >= 1 and not (scale_x.is_integer() and scale_y.is_integer())
        self.exact_fast = general and numba is not None
        if self.exact_fast:
            self.x_taps, self.y_taps = area_taps(width, size), area_taps(height, size)
            self._columns = np.empty((width, height), np.uint8)  # the pooled screen, transposed
            self._column_sums = np.empty((size, height), np.float32)  # horizontal pass, transposed
            self._row_sums = np.empty((height, size), np.float32)
            self._pixels = np.empty((size, size), np.float32)
            self.exact_fast = self.agrees_with_opencv()

    def agrees_with_opencv(self) -> bool:
        """Whether the compiled path gives ``cv2.resize``'s pixels on a random screen and an Atari-like one
        (few values: many exact halves, where a fused multiply-add would round differently). Warns if not."""
        width, height = self._columns.shape
        rng = np.random.default_rng(0)
        screens = [rng.integers(0, 256, (height, width), dtype=np.uint8),
                   (rng.integers(0, 3, (height, width)) * 37).astype(np.uint8)]
        out = np.empty((self.size, self.size), np.uint8)

        def agrees() -> bool:
            for screen in screens:
                expected = cv2.resize(screen, (self.size, self.size), interpolation=cv2.INTER_AREA)
                self._exact(screen, out)
                if not np.array_equal(out, expected):
                    warnings.warn(f"dqn_atari.envs.screens: the compiled area resize differs from this OpenCV's "
                                  f"({height}x{width} to {self.size}x{self.size}); using cv2.resize instead.")
                    return False
            return True

        return kernel_works(agrees, "dqn_atari.envs.screens", "cv2.resize")

    def __call__(self, newest: np.ndarray, previous: np.ndarray, out: np.ndarray) -> None:
        """Write into ``out`` the resized pixel-wise max of the screens; the max is left in ``newest`` (as
        ale-py's ``maxpool_frames``: a step cut short by a game over pools it again with a stale screen)."""
        np.maximum(newest, previous, out=newest)
        self.resize(newest, out)

    def resize(self, screen: np.ndarray, out: np.ndarray) -> None:
        """Write into ``out`` the area resize of ``screen``."""
        if (screen.shape, out.shape) != self._shapes:  # the compiled code does not check bounds; cv2 would
            raise ValueError(f"AreaResize: expected a screen of shape {self._shapes[0]} and an output of shape "
                             f"{self._shapes[1]}; got {screen.shape} and {out.shape}")  # write to a new array
        if self.exact_fast:
            self._exact(screen, out)
        else:
            cv2.resize(screen, (self.size, self.size), dst=out, interpolation=cv2.INTER_AREA)

    def _exact(self, screen: np.ndarray, out: np.ndarray) -> None:
        cv2.transpose(screen, self._columns)
        _weighted_rows(self._columns, *self.x_taps, self._column_sums)
        cv2.transpose(self._column_sums, self._row_sums)
        _weighted_rows(self._row_sums, *self.y_taps, self._pixels)
        _round_to_uint8(self._pixels, out)
