"""node_calls.py (test stand-in): what ComfyUI's built-in nodes call on a CLIP or VAE, step by step.

Followed: Comfy-Org/ComfyUI nodes.py at commit 02217e36a45bcbe2dd8fa24187aa5e053d9aea2e
(CLIPTextEncode, CLIPSetLastLayer, LoraLoader, VAEDecode, VAEDecodeTiled, VAEEncode,
VAEEncodeTiled) and comfy_extras/nodes_clip_sdxl.py (CLIPTextEncodeSDXL, 2025 form with
encode_from_tokens_scheduled; the copy the index held was a fork, see the report). Each
function is the body of one node's FUNCTION reduced to its calls on the CLIP / VAE, so a
proxy that passes these passes the nodes. Written for luna; nothing is copied.
"""

import comfy.sd


def clip_text_encode(clip, text):
    """CLIPTextEncode.encode"""
    if clip is None:
        raise RuntimeError("ERROR: clip input is invalid: None")
    tokens = clip.tokenize(text)
    return (clip.encode_from_tokens_scheduled(tokens),)


def clip_text_encode_sdxl(clip, width, height, crop_w, crop_h, target_width, target_height, text_g, text_l):
    """CLIPTextEncodeSDXL: G tokens from text_g, L from text_l, the shorter padded with
    empty-prompt chunks, size conditioning in the dict."""
    tokens = clip.tokenize(text_g)
    tokens["l"] = clip.tokenize(text_l)["l"]
    if len(tokens["l"]) != len(tokens["g"]):
        empty = clip.tokenize("")
        while len(tokens["l"]) < len(tokens["g"]):
            tokens["l"] += empty["l"]
        while len(tokens["l"]) > len(tokens["g"]):
            tokens["g"] += empty["g"]
    return (clip.encode_from_tokens_scheduled(tokens, add_dict={
        "width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
        "target_width": target_width, "target_height": target_height}),)


def clip_set_last_layer(clip, stop_at_clip_layer):
    """CLIPSetLastLayer.set_last_layer"""
    clip = clip.clone()
    clip.clip_layer(stop_at_clip_layer)
    return (clip,)


def lora_loader(model, clip, lora_sd, strength_model, strength_clip, lora_metadata=None):
    """LoraLoader.load_lora, the file already read (comfy.utils.load_torch_file with
    return_metadata=True): both strengths 0 return the inputs; otherwise
    load_lora_for_models runs, whatever one of the strengths is."""
    if strength_model == 0 and strength_clip == 0:
        return (model, clip)
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip,
                                         lora_metadata=lora_metadata)


def lora_loader_clip(clip, lora_sd, strength_clip, lora_metadata=None):
    """LoraLoader with no MODEL side (strength_model 0): its CLIP output."""
    return (lora_loader(None, clip, lora_sd, 0.0, strength_clip, lora_metadata)[1],)


def _latent(samples):
    latent = samples["samples"]
    if getattr(latent, "is_nested", False):
        latent = latent.unbind()[0]
    return latent


def vae_decode(vae, samples):
    """VAEDecode.decode (5-D video outputs folded into the batch)"""
    images = vae.decode(_latent(samples))
    if len(images.shape) == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return (images,)


def vae_decode_tiled(vae, samples, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
    """VAEDecodeTiled.decode: tile sizes divided by the spatial compression (latent units)."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    if temporal_size < temporal_overlap * 2:
        temporal_overlap = temporal_overlap // 2
    tc = vae.temporal_compression_decode()
    if tc is not None:
        temporal_size = max(2, temporal_size // tc)
        temporal_overlap = max(1, min(temporal_size // 2, temporal_overlap // tc))
    else:
        temporal_size = temporal_overlap = None
    latent = _latent(samples)
    c = vae.spacial_compression_decode()
    images = vae.decode_tiled(latent, tile_x=tile_size // c, tile_y=tile_size // c, overlap=overlap // c,
                              tile_t=temporal_size, overlap_t=temporal_overlap)
    if len(images.shape) == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return (images,)


def vae_encode(vae, pixels):
    """VAEEncode.encode: the image as it is (VAE.encode crops and drops extra channels)."""
    return ({"samples": vae.encode(pixels)},)


def vae_encode_tiled(vae, pixels, tile_size, overlap, temporal_size=64, temporal_overlap=8):
    """VAEEncodeTiled.encode: tile sizes in pixels; the temporal ones are always passed."""
    t = vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=overlap,
                         tile_t=temporal_size, overlap_t=temporal_overlap)
    return ({"samples": t},)
