"""`python -m dmclip.cli ...` (what `torchrun ... -m dmclip.cli` runs)."""

import sys

from dmclip.cli.main import main

sys.exit(main())
