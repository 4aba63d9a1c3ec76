"""Progress bars (tqdm) that also suit a log file.

On a terminal or in a notebook a bar redraws up to ten times a second. When stderr is a file (``nohup``, a
batch job's log) every redraw is written to it, which over a days-long run adds up to hundreds of megabytes,
so there the bar is redrawn once a minute.
"""

from __future__ import annotations

import sys

LOG_INTERVAL_S = 60.0


def progress_bar(**kwargs):
    """``tqdm.auto.tqdm(dynamic_ncols=True, **kwargs)``, redrawn at most once a minute when stderr is a file."""
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm as notebook

    if not issubclass(tqdm, notebook) and not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(dynamic_ncols=True, **kwargs)
