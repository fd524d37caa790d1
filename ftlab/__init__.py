"""ftlab: fine-tune Hugging Face transformers with PyTorch Lightning, by one policy switch."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes (which peft imports whenever it is installed) warns at import, on CPUs with AVX512-BF16, that an
# optional kernel package fetched from the hub is missing; its own CPU kernels run instead (and are what the
# tests check). One line on every command otherwise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
