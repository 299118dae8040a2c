"""opcod: On-Policy Co-Distillation trainer."""
__version__ = "0.1.0"
