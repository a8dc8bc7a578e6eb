"""The UltraFlux DiT and VAE on diffusers (see the README's layout section)."""

import logging

# bitsandbytes' import-time warning about a 4-bit kernel from a model hub: see curation/__init__.py.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
