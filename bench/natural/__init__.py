"""Natural questions, measured: `python -m bench.natural fetch|run|grade|summary` (docs/howto/evaluate.md).

This folder holds data and code side by side, apart by name: the data are `programs.json` (program -> requirement,
package, split), `<program>.jsonl` (the test split), `dev/<program>.jsonl` (the dev split) and `grades/<tag>.jsonl`
(hand grades); the code is the `.py` modules: `__main__` (the command line), `fetching` (wheels -> program trees),
`running` (the eval per program -> answers.jsonl) and `tables` (summary.md, the grading sheet, grades read back).
"""
from __future__ import annotations

from pathlib import Path

from pipeline import PROJECT_ROOT

DATA = Path(__file__).resolve().parent
OUT = PROJECT_ROOT / "outputs" / "natural"
