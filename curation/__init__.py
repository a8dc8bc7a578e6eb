"""Curation stages over columnar batches (see the README's layout section)."""

import logging

# bitsandbytes (a dependency of pyiqa, imported by diffusers and transformers when installed)
# warns at import, on CPUs with AVX512-BF16, that it could not download an optional 4-bit
# kernel from a model hub. No stage uses 4-bit kernels; its errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
