"""`python -m blip3o.cli ...` (as under torchrun): the `blip3o` command."""

import sys

from blip3o.cli.entry import main

sys.exit(main())
