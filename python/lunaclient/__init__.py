"""lunaclient -- a Python client for lunad, luna's text-encoder daemon.

lunad loads Stable Diffusion text encoders (and VAEs) once and serves requests to many
processes over a Unix socket (or TCP with a token). This package speaks its wire
protocol (docs/PROTOCOL.md) with nothing but the standard library and numpy:

    from lunaclient import Client
    with Client.unix() as c:                      # $LUNA_SOCKET, $XDG_RUNTIME_DIR/lunad.sock, ...
        cond, pooled, info = c.encode("sdxl.safetensors", tokens=clip.tokenize(prompt))

Failures raise LunaError(code, name, message), code being a luna status number
(include/luna.h); lunad's own errors keep its code and message.

VAE: c.vae_decode("sdxl.safetensors", latent) -> (image [B, 8h, 8w, 3], info), and
c.vae_encode(model, pixels) -> (latent [B, C, H/8, W/8], info), with progress=callable.

LoRAs: c.encode(..., loras=[("style.safetensors", 0.8)]) applies a LoRA stack to the
text encoders, uploading files lunad lacks; lora_identity(path) is a file's identity as
lunad computes it, extract_te(path) the image an upload sends. LoraImage(data, strength)
is a LoRA held in memory (the bytes of a safetensors image), uploaded from memory.

Embeddings: a token slot may hold a 1-D float vector instead of an id (ComfyUI's
"embedding:name"); encode() sends it to lunad as that slot's input embedding.

A Client is one connection; use it from one thread at a time (or guard it with a
lock). Different clients are independent.
"""

from .client import Client, default_socket
from .lora import Lora, LoraImage, extract_te, extract_te_image, identity_of_image, lora_identity
from .proto import LunaError

__all__ = ["Client", "Lora", "LoraImage", "LunaError", "default_socket", "extract_te", "extract_te_image",
           "identity_of_image", "lora_identity"]
