"""qlmctl: SLO-oriented queue management (QLM) for LLM serving."""

__version__ = "0.1.0"
