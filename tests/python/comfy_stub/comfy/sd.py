"""comfy.sd (test stand-in): load_lora_for_models as ComfyUI runs it, for the CLIP side.

Followed: Comfy-Org/ComfyUI comfy/sd.py at commit 033046cc4fac82d954c6daedccf1c8128433c4f1.
load_lora_for_models(model, clip, lora, strength_model, strength_clip, lora_metadata=None):
key map from model_lora_keys_unet(model.model) (not modelled: the stand-in takes
model=None only) then model_lora_keys_clip(clip.cond_stage_model); lora =
lora_convert.convert_lora(lora); loaded = load_lora(lora, key_map); for the CLIP:
new_clip = clip.clone(), k1 = new_clip.add_patches(loaded, strength_clip) and, when
lora_metadata is truthy, new_clip.patcher.set_attachments("lora_metadata", lora_metadata);
a loaded key taken by neither side is logged "NOT LOADED <key>". Returns (model patcher
or None, new clip or None). Nothing here skips a strength of 0: LoraLoader calls this
unless both strengths are 0, so a CLIP can receive patches at strength 0.
Written for luna from those facts; nothing is copied.
"""

import logging

from . import lora as comfy_lora
from . import lora_convert


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, lora_metadata=None):
    key_map = {}
    if model is not None:
        raise NotImplementedError("the stand-in models only the CLIP side (pass model=None)")
    if clip is not None:
        key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    lora = lora_convert.convert_lora(lora)
    loaded = comfy_lora.load_lora(lora, key_map)
    k = set()
    new_clip = None
    k1 = set()
    if clip is not None:
        new_clip = clip.clone()
        k1 = set(new_clip.add_patches(loaded, strength_clip))
        if lora_metadata:
            new_clip.patcher.set_attachments("lora_metadata", lora_metadata)
    for x in loaded:
        if x not in k and x not in k1:
            logging.warning("NOT LOADED %s", x)
    return None, new_clip
