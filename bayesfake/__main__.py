"""``python -m bayesfake`` is the ``bayesfake`` command."""

from bayesfake.cli import main

main()
