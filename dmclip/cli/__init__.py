from dmclip.cli.main import main

__all__ = ["main"]
