"""CortexCraft: small GPT language models, trained end to end. The library never imports Prefect."""

__version__ = "0.1.0"
