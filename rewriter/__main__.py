"""``python -m rewriter`` runs the command line."""

import sys

from rewriter.cli import main

sys.exit(main())
