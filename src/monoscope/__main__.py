"""`python -m monoscope` (and `torchrun -m monoscope`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
