"""Sub-commands of ``imgclf``; one module each (see :mod:`imgclf.cli`)."""
