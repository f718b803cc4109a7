"""Text assets shipped with the package (the walkthrough's project summary)."""
