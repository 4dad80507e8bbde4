"""luna for ComfyUI -- nodes whose CLIP and VAE run in lunad, shared by every ComfyUI process.

Link or copy this folder into ComfyUI/custom_nodes/ (README "Use with ComfyUI"). It needs
torch and numpy (ComfyUI's) and the luna Python client (see daemon.py for where it is
looked for). Importing it needs neither ComfyUI nor a running lunad.
"""

from .clip_proxy import LunaCLIP
from .daemon import LunaDaemonError
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .vae_proxy import LunaVAE

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "LunaCLIP", "LunaVAE", "LunaDaemonError"]
