"""Fault, refusal and soak tests: reuse the server tests' helpers (a uvicorn server, reference answers)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
sys.path.insert(0, str(Path(__file__).parent.parent))
