"""rct-dist: distributed embedding transfer with the relaxed contrastive loss."""

__version__ = "0.1.0"
