"""Helpers and value types shared by stages (stages never import each other, only this package)."""
