"""vae_proxy.py -- LunaVAE: a stand-in for comfy.sd.VAE whose encoder and decoder run in lunad.

Tensors in and out are what comfy.sd.VAE takes and returns (NUMERICS.md 6.4; the surface
follows Comfy-Org/ComfyUI comfy/sd.py at 033046cc4fac82d954c6daedccf1c8128433c4f1):
decode(samples, vae_options={}) takes the unscaled latent [B, C, h, w] (of a 5-D one,
frame 0, as ComfyUI does for an image VAE) and returns float32 [B, 8h, 8w, 3] on the CPU;
encode(pixels, not_video=None) takes pixels [B, H, W, C] in [0, 1], crops H and W to
multiples of 8 (centred) and keeps the first 3 channels, as VAE.vae_encode_crop_pixels
does (VAEEncode passes RGBA images whole), and returns the float32 latent mean.
decode_tiled() takes its tile sizes in latent units (VAEDecodeTiled passes
tile_size // spacial_compression_decode()), encode_tiled() in pixels; both become lunad's
pixel units. tile_t / overlap_t are ignored for images, as ComfyUI does for a 2-D VAE
(VAEEncodeTiled always passes them). Memory estimates are tiny: the work is not done here.
"""

import numpy as np

from .daemon import LunaDaemonError


def _torch():
    import torch
    return torch


class LunaVAE:
    """A drop-in for comfy.sd.VAE served by lunad.

    conn             daemon.Connection
    model            lunad's name of the file holding the VAE (a VAE file or a checkpoint)
    latent_channels  4 (SD1, SDXL) or 16 (SD3, Flux)
    ratio            the spatial factor (8)
    """

    def __init__(self, conn, model, latent_channels=4, ratio=8):
        torch = _torch()
        self.conn = conn
        self.model = model
        self.latent_channels = int(latent_channels)
        self.downscale_ratio = int(ratio)
        self.upscale_ratio = int(ratio)
        self.latent_dim = 2
        self.output_channels = 3
        self.vae_dtype = torch.float32
        self.device = torch.device("cpu")
        self.output_device = torch.device("cpu")
        self.disable_offload = False
        self.not_video = False
        self.crop_input = True
        self.handles_tiling = False
        self.pad_channel_value = None
        self.extra_1d_channel = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.format_encoded = None
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.size = 0
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.last_info = None

    def __repr__(self):
        return "LunaVAE(%r at %s)" % (self.model, self.conn.endpoint)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError("the Luna proxy VAE has no '%s': its model runs in lunad, and this ComfyUI feature "
                             "needs the model in this process" % name)

    # ---- sizes and memory ---------------------------------------------------------

    def memory_used_encode(self, shape, dtype=None):
        return 1 << 20

    def memory_used_decode(self, shape, dtype=None):
        return 1 << 20

    def model_size(self):
        return 0

    def is_dynamic(self):
        return False

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def vae_output_dtype(self):
        return _torch().float32

    def throw_exception_if_invalid(self):
        pass

    def get_sd(self):
        raise LunaDaemonError("the Luna proxy VAE holds no weights (they are in lunad): it cannot be saved")

    def vae_encode_crop_pixels(self, pixels):
        """ComfyUI's VAE.vae_encode_crop_pixels: each spatial dimension cropped (centred)
        to a multiple of the ratio, then only the first output_channels channels."""
        if self.crop_input:
            r = self.spacial_compression_encode()
            for d, size in enumerate(pixels.shape[1:-1]):
                keep = (size // r) * r
                if keep != size:
                    pixels = pixels.narrow(d + 1, (size % r) // 2, keep)
        if pixels.shape[-1] > self.output_channels:
            pixels = pixels[..., :self.output_channels]
        return pixels

    # ---- work ---------------------------------------------------------------------

    @staticmethod
    def _array(t, what, rank):
        torch = _torch()
        if isinstance(t, torch.Tensor):
            t = t.detach().to("cpu", torch.float32).numpy()
        a = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        if a.ndim != rank:
            raise LunaDaemonError("the Luna proxy VAE %s takes a %d-D tensor, not %s (video VAEs are not served)"
                                  % (what, rank, list(a.shape)))
        return a

    def _run(self, op, arr, tiled, tile, overlap):
        def call(c):
            fn = c.vae_decode if op == "decode" else c.vae_encode
            return fn(self.model, arr, tiled=tiled, tile=tile, overlap=overlap)

        out, info = self.conn.run("VAE %s with %s" % (op, self.model), call)
        self.last_info = info
        return _torch().from_numpy(np.array(out, dtype=np.float32))

    def _pixels(self, pixel_samples, what):
        torch = _torch()
        if not isinstance(pixel_samples, torch.Tensor):
            pixel_samples = torch.as_tensor(np.asarray(pixel_samples, dtype=np.float32))
        if pixel_samples.dim() != 4:
            raise LunaDaemonError("the Luna proxy VAE %s takes images [B, H, W, C], not %s (video VAEs are not "
                                  "served)" % (what, list(pixel_samples.shape)))
        px = self._array(self.vae_encode_crop_pixels(pixel_samples), what, 4)
        if px.shape[3] != 3:
            raise LunaDaemonError("the Luna proxy VAE %s needs RGB images; this one has %d channels"
                                  % (what, px.shape[3]))
        return px

    def decode(self, samples_in, vae_options={}):
        if vae_options:
            raise LunaDaemonError("vae_options %s: decode options are not something lunad takes" % sorted(vae_options))
        if getattr(samples_in, "ndim", 0) == 5 and self.latent_dim == 2:
            samples_in = samples_in[:, :, 0]
        lat = self._array(samples_in, "decode", 4)
        if lat.shape[1] != self.latent_channels:
            raise LunaDaemonError("a %d-channel latent for a %d-channel VAE (%s)"
                                  % (lat.shape[1], self.latent_channels, self.model))
        return self._run("decode", lat, "auto", 512, 64)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        tile_x = 64 if tile_x is None else int(tile_x)
        tile_y = 64 if tile_y is None else int(tile_y)
        overlap = 16 if overlap is None else int(overlap)
        if tile_x != tile_y:
            raise LunaDaemonError("lunad tiles with square tiles; got %d x %d latent units" % (tile_x, tile_y))
        # tile_t / overlap_t: ignored for a 4-D latent, as comfy.sd.VAE.decode_tiled does
        lat = self._array(samples, "decode_tiled", 4)
        r = self.upscale_ratio
        return self._run("decode", lat, True, tile_x * r, overlap * r)

    def encode(self, pixel_samples, not_video=None):
        return self._run("encode", self._pixels(pixel_samples, "encode"), "auto", 512, 64)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None,
                     not_video=None):
        tile_x = 512 if tile_x is None else int(tile_x)
        tile_y = 512 if tile_y is None else int(tile_y)
        overlap = 64 if overlap is None else int(overlap)
        if tile_x != tile_y:
            raise LunaDaemonError("lunad tiles with square tiles; got %d x %d pixels" % (tile_x, tile_y))
        # tile_t / overlap_t: ignored for images, as comfy.sd.VAE.encode_tiled does for a 2-D VAE
        return self._run("encode", self._pixels(pixel_samples, "encode_tiled"), True, tile_x, overlap)
