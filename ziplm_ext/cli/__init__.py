"""The command line: ``ziplm prune | latency | eval`` (also ``python -m ziplm_ext``)."""
from ziplm_ext.cli.commands import main

__all__ = ["main"]
