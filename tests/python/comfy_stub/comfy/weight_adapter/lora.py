"""comfy.weight_adapter.{lora,loha,lokr,glora,oft,boft} (test stand-in), in one file.

Interfaces as in ComfyUI (commits in base.py). What each load() recognises and builds:
  LoRAAdapter: the first of seven up/down name pairs present under prefix x
      (x.lora_up.weight / x.lora_down.weight, x_lora.up.weight / x_lora.down.weight,
      x.lora_B.weight / x.lora_A.weight, x.lora.up.weight / x.lora.down.weight,
      x.lora_B / x.lora_A, x.lora_linear_layer.up.weight / .down.weight,
      x.lora_B.default.weight / x.lora_A.default.weight); x.lora_mid.weight only with the
      first pair; x.reshape_weight (as a list) with any pair.
      weights = (up, down, alpha, mid, dora_scale, reshape)
  LoHaAdapter: x.hada_w1_a present; x.hada_t1 (and then x.hada_t2) optional.
      weights = (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)
  LoKrAdapter: any of x.lokr_w1, x.lokr_w2, x.lokr_w1_a, x.lokr_w2_a present (every
      lokr_* key found is consumed, also when none of those four is there).
      weights = (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale)
  GLoRAAdapter: x.a1.weight present. weights = (a1, a2, b1, b2, alpha, dora_scale)
  OFTAdapter / BOFTAdapter: x.oft_blocks of rank 3 / rank 4; x.rescale optional.
      weights = (blocks, rescale, alpha, dora_scale)
"""

from .base import WeightAdapterBase

_PAIRS = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)


def _keys(loaded_keys):
    return set() if loaded_keys is None else loaded_keys


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        keys = _keys(loaded_keys)
        for up_sfx, down_sfx, mid_sfx in _PAIRS:
            up_name = x + up_sfx
            if up_name not in lora:
                continue
            down_name = x + down_sfx
            mid = None
            if mid_sfx is not None and x + mid_sfx in lora:
                mid = lora[x + mid_sfx]
                keys.add(x + mid_sfx)
            reshape = None
            if x + ".reshape_weight" in lora:
                try:
                    reshape = lora[x + ".reshape_weight"].tolist()
                    keys.add(x + ".reshape_weight")
                except Exception:
                    pass
            weights = (lora[up_name], lora[down_name], alpha, mid, dora_scale, reshape)
            keys.add(up_name)
            keys.add(down_name)
            return cls(keys, weights)
        return None


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        keys = _keys(loaded_keys)
        if x + ".hada_w1_a" not in lora:
            return None
        t1 = t2 = None
        if x + ".hada_t1" in lora:
            t1, t2 = lora[x + ".hada_t1"], lora[x + ".hada_t2"]
            keys.update((x + ".hada_t1", x + ".hada_t2"))
        names = [x + s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")]
        w1a, w1b, w2a, w2b = (lora[n] for n in names)
        keys.update(names)
        return cls(keys, (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        keys = _keys(loaded_keys)
        part = {}
        for s in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"):
            name = "%s.%s" % (x, s)
            part[s] = lora[name] if name in lora else None
            if part[s] is not None:
                keys.add(name)
        if all(part[s] is None for s in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            return None
        return cls(keys, (part["lokr_w1"], part["lokr_w2"], alpha, part["lokr_w1_a"], part["lokr_w1_b"],
                          part["lokr_w2_a"], part["lokr_w2_b"], part["lokr_t2"], dora_scale))


class GLoRAAdapter(WeightAdapterBase):
    name = "glora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        keys = _keys(loaded_keys)
        names = [x + s for s in (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")]
        if names[0] not in lora:
            return None
        keys.update(names)
        a1, a2, b1, b2 = (lora[n] for n in names)
        return cls(keys, (a1, a2, b1, b2, alpha, dora_scale))


class _BlocksAdapter(WeightAdapterBase):
    rank = None

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        keys = _keys(loaded_keys)
        blocks = lora.get(x + ".oft_blocks")
        if blocks is None or blocks.ndim != cls.rank:
            return None
        keys.add(x + ".oft_blocks")
        rescale = None
        if x + ".rescale" in lora:
            rescale = lora[x + ".rescale"]
            keys.add(x + ".rescale")
        return cls(keys, (blocks, rescale, alpha, dora_scale))


class OFTAdapter(_BlocksAdapter):
    name = "oft"
    rank = 3


class BOFTAdapter(_BlocksAdapter):
    name = "boft"
    rank = 4
