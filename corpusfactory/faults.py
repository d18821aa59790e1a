"""Named pause points, so fault tests can kill a process at an exact step.

Set ``CORPUSFACTORY_PAUSE_AT=name[,name...]`` and the process stops for good when it
reaches one of those points, after creating the file ``$CORPUSFACTORY_PAUSE_DIR/<name>``
so a test knows it is there and can kill it. Unset (always, outside tests) a pause
point costs one environment lookup. Points: ``fit.train`` (after an optimizer step),
``fit.save`` (weights written, stats not yet), ``snapshot.publish`` (renamed into
place, completeness marker not yet).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def pause_point(name: str) -> None:
    wanted = os.environ.get("CORPUSFACTORY_PAUSE_AT", "")
    if not wanted or name not in wanted.split(","):
        return
    where = os.environ.get("CORPUSFACTORY_PAUSE_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        Path(where, name).write_text(str(os.getpid()), encoding="utf-8")
    log.warning("pausing at %s until killed (CORPUSFACTORY_PAUSE_AT)", name)
    while True:
        time.sleep(3600)
