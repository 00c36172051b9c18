"""The command line's progress bar, in the `progress(done, total)` callback shape every long engine call takes."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def progress_bar(desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr, yielded as a `progress(done, total)` callback (None when not enabled)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=None, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()
