"""Sub-commands of the ``edgecloud`` CLI (see :mod:`edgecloud.cli`)."""
