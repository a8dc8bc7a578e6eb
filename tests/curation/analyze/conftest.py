"""Lets this folder's tests import `native_images` (the suite runs in importlib mode)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
