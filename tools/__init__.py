"""Command-line tools that make the data shipped in stages/data/ (run from the repository root; no test imports them)."""
