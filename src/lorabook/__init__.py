"""lorabook: the package shared by every chapter of the book.

Modules are named by concept (see HOUSE_STYLE): ``config`` (run settings, device, dtype),
``models`` (offline base models), ``data`` (tasks and tokenisation), ``train`` (the one loop),
``lora`` (LoRA from scratch), ``quant`` (NF4 from scratch), ``baselines``, ``bench``, ``viz``.
Importing it computes nothing; it only installs one logging filter for a harmless bitsandbytes
notice (``quiet.drop_known_notices``).
"""

from lorabook import quiet as _quiet

__version__ = "0.1.0"

_quiet.drop_known_notices()
