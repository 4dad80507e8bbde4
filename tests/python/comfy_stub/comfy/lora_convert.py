"""comfy.lora_convert (test stand-in): convert_lora as in Comfy-Org/ComfyUI
comfy/lora_convert.py at commit 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5.

convert_lora(sd) rewrites only diffusion-model LoRA formats, each recognised by marker
keys: BFL Flux control LoRAs (img_in.lora_A.weight + single_blocks.0.norm.key_norm.scale),
Wan Fun (lora_unet__blocks_0_cross_attn_k.lora_down.weight), USO
(single_blocks.37.processor.qkv_lora.up.weight + double_blocks.18.processor.qkv_lora2.up.weight)
and fused attention to_qkv adapters of Krea2 (a key matching attn[._]to_qkv and holding
"text_fusion" or "transformer_blocks"). Anything else, every SD1/SDXL text-encoder LoRA
included, is returned unchanged (the same dict). The stand-in models the detection; a
diffusion-model format raises, since luna's tests never load one.
"""

import re

_FUSED_QKV = re.compile(r"(.*attn[._]to_)qkv(?=\.|$)")


def _diffusion_format(sd):
    if "img_in.lora_A.weight" in sd and "single_blocks.0.norm.key_norm.scale" in sd:
        return "BFL control"
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in sd:
        return "Wan Fun"
    if "single_blocks.37.processor.qkv_lora.up.weight" in sd and \
            "double_blocks.18.processor.qkv_lora2.up.weight" in sd:
        return "USO"
    if any(_FUSED_QKV.search(k) is not None and ("text_fusion" in k or "transformer_blocks" in k) for k in sd):
        return "fused qkv"
    return None


def convert_lora(sd):
    fmt = _diffusion_format(sd)
    if fmt is not None:
        raise NotImplementedError("the stand-in does not convert %s LoRAs (diffusion-model formats)" % fmt)
    return sd
