"""`python -m revgan_med` is the same as the `revgan-med` command."""

import sys

from revgan_med.cli import main

sys.exit(main())
