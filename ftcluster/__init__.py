"""ftcluster: distributed fine-tuning of open LLMs (Hydra configs, Ray placement, DeepSpeed ZeRO)."""

__version__ = "0.1.0"
