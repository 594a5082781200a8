"""Runnable tools: benchmarks, reports, plots (`uv run scripts/NAME.py --help`).

They import the repository's packages (`trainer`, `models`, `data`, `scripts`) by name: in the uv
environment the repository root is on `sys.path`, since the project is installed in editable mode
(`dev-mode-dirs` in pyproject.toml), and pytest adds it too (`pythonpath`).
"""
