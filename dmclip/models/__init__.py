"""Importing this package registers its built-in entries."""
