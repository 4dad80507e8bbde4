"""comfy.weight_adapter (test stand-in): the adapter classes load_lora tries, in ComfyUI's
order (LoRA, LoHa, LoKr, GLoRA, OFT, BOFT; comfy/weight_adapter/__init__.py at
comfyanonymous/ComfyUI dc05edb). See base.py and lora.py."""

from .base import WeightAdapterBase
from .lora import BOFTAdapter, GLoRAAdapter, LoHaAdapter, LoKrAdapter, LoRAAdapter, OFTAdapter

adapters = [LoRAAdapter, LoHaAdapter, LoKrAdapter, GLoRAAdapter, OFTAdapter, BOFTAdapter]

__all__ = ["WeightAdapterBase", "adapters"] + [a.__name__ for a in adapters]
