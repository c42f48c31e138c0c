"""`hfsam`, the command line: flags in, the API's workflows called, results and exit codes out.

``app`` builds the parser and runs a command; each command group has its module here.
"""

from .app import main

__all__ = ["main"]
