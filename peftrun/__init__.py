"""peftrun: fine-tune Hugging Face models from one YAML recipe."""

__version__ = "0.1.0"
