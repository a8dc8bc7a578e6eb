"""The UltraFlux DiT and VAE on diffusers (see the README's layout section)."""

import logging

ROPE_METHODS = ("base", "yarn", "resonance", "resonance_yarn", "ultraflux_released")
"""The RoPE methods (`model.rope` describes each): here, where naming them imports no torch
(`native4k generate --rope-method` checks its value against them before loading anything)."""

# bitsandbytes' import-time warning about a 4-bit kernel from a model hub: see curation/__init__.py.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
