"""Library notices that say nothing about the book's results, kept out of its outputs (chapter 5).

bitsandbytes 0.50 on a CPU with AVX-512 BF16 tries, when it is imported (peft and transformers
import it too), to fetch an optional faster kernel from the ``kernels`` package, and logs
"Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is not installed. It
then runs its pure-PyTorch path, which chapters 5-7 compare against byte for byte: the notice is
harmless, and shown in a chapter it reads as an error. ``drop_known_notices()`` installs one
logging filter for exactly that message (idempotent); ``import lorabook`` calls it, so every
chapter, whose first cell imports lorabook, is covered. Nothing else is filtered.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional ``kernels`` package is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KERNELS_NOTICE)


def drop_known_notices() -> None:
    """Filter bitsandbytes' harmless "no kernels package" notice from its CPU logger (chapter 5)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelsNotice) for f in logger.filters):
        logger.addFilter(_DropKernelsNotice())


__all__ = ["BNB_CPU_LOGGER", "KERNELS_NOTICE", "drop_known_notices"]
