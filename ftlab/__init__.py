"""ftlab: fine-tune Hugging Face transformers with PyTorch Lightning, by one policy switch."""

__version__ = "0.1.0"
