"""Bridges from other libraries' modules to lrk's ops.

Each submodule imports its library on import (``lrk.integrations.peft`` needs
PEFT); this package itself imports nothing optional.
"""
