"""``python -m ckptguard.cli``: the ``ckptguard`` command without its console script."""

import sys

from ckptguard.cli import main

main(sys.argv[1:])
