"""lorabook.quiet: bitsandbytes' harmless "no kernels package" notice is dropped, nothing else."""

from __future__ import annotations

import logging

import lorabook  # noqa: F401  (importing installs the filter)
from lorabook import quiet


def test_kernels_notice_is_dropped_other_records_pass(caplog):
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    quiet.drop_known_notices()
    quiet.drop_known_notices()  # idempotent
    assert sum(type(f).__name__ == "_DropKernelsNotice" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=quiet.BNB_CPU_LOGGER):
        logger.warning(quiet.KERNELS_NOTICE + ": %s. Please make sure ...", "No module 'kernels'")
        logger.warning("a different warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a different warning"]
