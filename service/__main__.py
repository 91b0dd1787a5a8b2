"""`python -m service` runs the command line."""

import sys

from service.app.cli import main

sys.exit(main())
