"""The `buf` command line the tests drive the server with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# buf-bin is a dev dependency: its binary sits beside the venv's python.
BUF = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
