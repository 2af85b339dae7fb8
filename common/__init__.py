"""Leaf utilities every layer may use (structured logs); imports nothing of the project."""
