"""``python -m imgclf``: the same as the ``imgclf`` command (torchrun's ``-m imgclf train ...``)."""

import sys

from imgclf.cli import main

sys.exit(main())
