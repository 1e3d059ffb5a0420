"""Bridges to the field's own tools (optional packages, imported only inside the functions that need them)."""
