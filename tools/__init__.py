"""Developer tools: ``python -m tools.format``, ``python -m tools.lint``, data tools."""
