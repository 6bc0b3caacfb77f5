"""Server side: the ServerApp, the per-round plan, central evaluation and the run record."""
