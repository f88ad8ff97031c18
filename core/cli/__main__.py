"""``python -m samadapt.cli``: the same as the ``samadapt`` command."""

from samadapt.cli import _entry

_entry()
