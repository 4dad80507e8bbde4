"""comfy.weight_adapter.base (test stand-in).

Follows Comfy-Org/ComfyUI comfy/weight_adapter/base.py as of the adapter files read at
comfyanonymous/ComfyUI 0bca89e / dc05edb (__init__), 0323d87 (lora.py), 183b377 (loha.py),
e8f3bc5 (lokr.py), eadb911 (oft.py), 204e96f (boft.py), a0f6703 (glora.py): an adapter
has a class attribute 'name', instance attributes 'loaded_keys' (the file keys it
consumed) and 'weights' (a tuple), and a classmethod load(x, lora, alpha, dora_scale,
loaded_keys=None) returning an adapter or None. No maths: luna's proxy only reads them.
Written for luna from those facts; nothing is copied.
"""


class WeightAdapterBase:
    name = None

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError
