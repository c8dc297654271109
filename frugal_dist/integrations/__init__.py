"""Integrations with other training frameworks (optional dependencies, imported on use)."""
