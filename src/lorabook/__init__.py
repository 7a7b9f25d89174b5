"""lorabook: the package shared by every chapter of the book.

Modules are named by concept (see HOUSE_STYLE): ``config`` (run settings, device, dtype),
``models`` (offline base models), ``data`` (tasks and tokenisation), ``train`` (the one loop),
``lora`` (LoRA from scratch), ``quant`` (NF4 from scratch), ``baselines``, ``bench``, ``viz``.
Nothing happens at import.
"""

__version__ = "0.1.0"
