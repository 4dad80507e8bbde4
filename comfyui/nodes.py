"""nodes.py -- the ComfyUI nodes of the luna package: daemon loaders, the checkpoint tunnel, status.

  LunaDaemonCLIPLoader  text encoder file(s) + type -> a LunaCLIP (only the tokenizer here)
  LunaDaemonVAELoader   a VAE file -> a LunaVAE
  LunaCheckpointTunnel  MODEL, CLIP, VAE of any checkpoint loader -> MODEL unchanged, a
                        LunaCLIP and a LunaVAE on the same file once lunad's weights are
                        shown to be the local ones; the local copies are released. Whatever
                        cannot be verified stays local, with a warning.
  LunaDaemonStatus      lunad's status as text

ComfyUI modules (folder_paths, comfy.*) are imported inside the functions, so this
package imports without ComfyUI.
"""

import json
import logging

from . import files
from .clip_proxy import LunaCLIP, make_tokenizer
from .daemon import LunaDaemonError, connection, endpoint
from .vae_proxy import LunaVAE

log = logging.getLogger("luna")

CATEGORY = "luna"
AUTO = "(remembered by the loader)"

DAEMON_INPUTS = {
    "daemon": ("STRING", {"default": "", "tooltip": "lunad's socket (unix:PATH or PATH) or HOST:PORT; empty: "
                                                    "LUNA_ADDRESS / LUNA_SOCKET from the environment"}),
    "token_file": ("STRING", {"default": "", "tooltip": "for HOST:PORT: the file holding lunad's token; empty: "
                                                        "LUNA_TOKEN_FILE"}),
}


def _folder_paths():
    import folder_paths
    return folder_paths


def _full_path(kind, name):
    fp = _folder_paths()
    get = getattr(fp, "get_full_path_or_raise", None)
    if get is not None:
        return get(kind, name)
    p = fp.get_full_path(kind, name)
    if p is None:
        raise FileNotFoundError("model in folder '%s' with filename '%s' not found" % (kind, name))
    return p


def _name_for(path, kind):
    fp = _folder_paths()
    return files.daemon_name(path, fp.get_folder_paths(kind), getattr(fp, "models_dir", None))


def _warn(text):
    log.warning("[luna] %s", text)
    print("[luna] WARNING: %s" % text)


class LunaDaemonCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        names = _folder_paths().get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (["none"] + list(names),),
                             "type": (["sd1", "sdxl"],)},
                "optional": dict(DAEMON_INPUTS)}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "A CLIP whose text encoders run in lunad (shared by every ComfyUI process): sd1 takes a CLIP-L " \
                  "file, sdxl a CLIP-L and a CLIP-G file."

    def load(self, clip_name1, clip_name2="none", type="sd1", daemon="", token_file=""):
        names = [n for n in (clip_name1, clip_name2) if n and n != "none"]
        paths = [_full_path("text_encoders", n) for n in names]
        shapes = files.merge_shapes(paths)
        family = files.family_of(shapes)
        if family != type:
            raise LunaDaemonError("%s hold%s a %s text encoder set, not %s" % (
                " + ".join(names), "" if len(names) > 1 else "s", family, type))
        model = [_name_for(p, "text_encoders") for p in paths]
        model = model[0] if len(model) == 1 else model
        conn = connection(endpoint(daemon, token_file))
        reply = conn.run("loading the text encoders %s" % (model,), lambda c: c.models("load", model))
        got = (reply.get("model") or {}).get("family")
        if got is not None and got != family:
            raise LunaDaemonError("lunad at %s loaded %s as %s, not %s" % (conn.endpoint, model, got, family))
        tokenizer = make_tokenizer(family, _folder_paths().get_folder_paths("embeddings"))
        return (LunaCLIP(conn, model, family, files.clip_state_shapes(shapes), tokenizer),)


class LunaDaemonVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (_folder_paths().get_filename_list("vae"),)},
                "optional": dict(DAEMON_INPUTS)}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "A VAE that encodes and decodes in lunad (shared by every ComfyUI process)."

    def load(self, vae_name, daemon="", token_file=""):
        path = _full_path("vae", vae_name)
        channels, ratio = files.vae_info(path)
        model = _name_for(path, "vae")
        conn = connection(endpoint(daemon, token_file))
        conn.run("loading the VAE %s" % model, lambda c: _load_vae(c, model))
        return (LunaVAE(conn, model, channels, ratio),)


def _load_vae(c, model):
    from .daemon import lunaclient
    return c.call(lunaclient().client.proto.MSG_MODELS, {"action": "load", "model": model, "kind": "vae"})[0]


# ---------------------------------------------------------------- the tunnel

def remembered_path(clip=None, model=None, vae=None):
    """The checkpoint file a ComfyUI checkpoint loader remembered on its outputs, or None.

    comfy.sd.load_checkpoint_guess_config (Comfy-Org/ComfyUI comfy/sd.py at 033046cc)
    stores reload recipes (factory, (ckpt_path, ...)[, index]):
    model.cached_patcher_init = (load_checkpoint_guess_config, (ckpt_path, ...), 0),
    clip.patcher.cached_patcher_init = (load_checkpoint_clip_patcher, (ckpt_path, ...)),
    vae.patcher.cached_patcher_init = (load_checkpoint_vae_patcher, (ckpt_path, ...));
    earlier versions used load_checkpoint_guess_config_model_only / _clip_only. Only
    factories named load_checkpoint* count: CLIPLoader's load_clip_model_patcher (a list
    of text-encoder files), VAELoader's load_vae_patcher (a VAE file) and the diffusion
    model loaders do not name a checkpoint."""
    holders = []
    if clip is not None:
        holders.append(getattr(clip, "patcher", None))
    holders.append(model)
    if vae is not None:
        holders.append(getattr(vae, "patcher", None))
    for h in holders:
        init = getattr(h, "cached_patcher_init", None) if h is not None else None
        if not isinstance(init, tuple) or len(init) < 2 or not isinstance(init[1], (tuple, list)) or not init[1]:
            continue
        factory = getattr(init[0], "__name__", "")
        p = init[1][0]
        if factory.startswith("load_checkpoint") and isinstance(p, str) and p:
            return p
    return None


def vae_probe_tolerance(vae):
    """(max |diff|, mean |diff|) a local decode may differ from lunad's by and still be
    the same weights: tight for an fp32 VAE (lunad is within 3e-6 of PyTorch), looser for
    a bf16/fp16 one (rounding of the local activations)."""
    import torch
    if getattr(vae, "vae_dtype", torch.float32) == torch.float32:
        return 1e-3, 1e-4
    return 0.1, 5e-3


def tunnel_clip(conn, name, clip):
    """A LunaCLIP for the local 'clip' of checkpoint 'name' after verifying lunad's weights
    against it; raises LunaDaemonError / ValueError saying why not."""
    if isinstance(clip, LunaCLIP):
        return clip
    reused = getattr(clip, "_luna_proxy", None)
    if isinstance(reused, LunaCLIP):
        return reused.clone()
    patcher = getattr(clip, "patcher", None)
    if getattr(patcher, "patches", None):
        raise LunaDaemonError("the CLIP already carries patches (LoRAs): connect the tunnel straight after the loader")
    if getattr(patcher, "forced_hooks", None) is not None:
        raise LunaDaemonError("the CLIP carries hooks, which the Luna proxy does not support")
    sd = clip.cond_stage_model.state_dict()
    family = files.clip_family_of_keys(sd.keys())
    if family is None:
        raise LunaDaemonError("the CLIP is not CLIP-L or CLIP-L + CLIP-G (SD1/SDXL): lunad does not serve it")
    reply = conn.run("loading the text encoders of %s" % name, lambda c: c.models("load", name))
    got = (reply.get("model") or {}).get("family")
    if got is not None and got != family:
        raise LunaDaemonError("lunad reads %s as %s, the local CLIP is %s" % (name, got, family))
    remote = conn.run("verifying %s" % name, lambda c: c.models("verify", name)).get("weights_crc32") or {}
    ok, why = files.crcs_match(files.clip_crcs(sd), remote)
    if not ok:
        raise LunaDaemonError("lunad's %s is not the local CLIP: %s" % (name, why))
    proxy = LunaCLIP(conn, name, family, [(k, tuple(v.shape)) for k, v in sd.items()], clip.tokenizer)
    proxy.layer_idx = getattr(clip, "layer_idx", None)
    proxy.tokenizer_options = dict(getattr(clip, "tokenizer_options", {}) or {})
    return proxy


def tunnel_vae(conn, name, vae):
    """A LunaVAE for the local 'vae' of checkpoint 'name' once a probe decode agrees
    (lunad's verify has no CRC for VAEs); raises saying why not."""
    import torch
    if isinstance(vae, LunaVAE):
        return vae
    reused = getattr(vae, "_luna_proxy", None)
    if isinstance(reused, LunaVAE):
        return reused
    ratio = getattr(vae, "upscale_ratio", 8)
    channels = getattr(vae, "latent_channels", 4)
    if ratio != 8 or getattr(vae, "downscale_ratio", 8) != 8 or channels not in (4, 16):
        raise LunaDaemonError("the VAE is not an 8x AutoencoderKL with 4 or 16 latent channels: lunad does not serve it")
    conn.run("loading the VAE of %s" % name, lambda c: _load_vae(c, name))
    proxy = LunaVAE(conn, name, channels, ratio)
    g = torch.Generator().manual_seed(0)
    probe = torch.randn((1, channels, 8, 8), generator=g)
    remote = proxy.decode(probe)
    local = vae.decode(probe).detach().to("cpu", torch.float32).reshape(remote.shape)
    d = (local - remote).abs()
    max_tol, mean_tol = vae_probe_tolerance(vae)
    if float(d.max()) > max_tol or float(d.mean()) > mean_tol:
        raise LunaDaemonError("lunad's VAE of %s decodes differently from the local one (max |diff| %.3g, mean %.3g)"
                              % (name, float(d.max()), float(d.mean())))
    return proxy


def release_local(obj, proxy):
    """Free the weights of a local CLIP or VAE that a proxy replaces: unload it from
    ComfyUI's model management and move its modules to the meta device. The object
    remembers its proxy, so a re-run of the graph (the loader's output is cached) gets
    the proxy again. Returns '' or a warning."""
    module = getattr(obj, "cond_stage_model", None) or getattr(obj, "first_stage_model", None)
    patcher = getattr(obj, "patcher", None)
    try:
        obj._luna_proxy = proxy
    except Exception:
        pass
    try:
        try:
            import comfy.model_management as mm
        except ImportError:
            mm = None
        loaded = getattr(mm, "current_loaded_models", None) if mm is not None else None
        if isinstance(loaded, list):
            for lm in list(loaded):
                lp = getattr(lm, "model", None)
                if lp is not None and lp is patcher:
                    lm.model_unload()
                    loaded.remove(lm)
        if module is not None and hasattr(module, "to"):
            module.to("meta")
        if mm is not None and hasattr(mm, "soft_empty_cache"):
            mm.soft_empty_cache()
    except Exception as e:  # the proxy works either way; only memory stays
        return "the local %s could not be released (%s): it stays in memory" % (type(obj).__name__, e)
    return ""


class LunaCheckpointTunnel:
    @classmethod
    def INPUT_TYPES(cls):
        names = [AUTO] + list(_folder_paths().get_filename_list("checkpoints"))
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)},
                "optional": dict({"ckpt_name": (names, {"tooltip": "the checkpoint the loader read, when the "
                                                                   "loader does not remember it"}),
                                  "release_local": ("BOOLEAN", {"default": True})}, **DAEMON_INPUTS)}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE", "report")
    FUNCTION = "tunnel"
    CATEGORY = CATEGORY
    DESCRIPTION = "Serves the checkpoint's CLIP and VAE from lunad once its weights are shown to be the same, and " \
                  "releases the local copies; anything that cannot be verified passes through with a warning."

    def tunnel(self, model, clip, vae, ckpt_name=AUTO, release_local=True, daemon="", token_file=""):
        report = []

        def keep(what, why):
            _warn("%s stays local: %s" % (what, why))
            report.append("%s: LOCAL (%s)" % (what, why))

        path = remembered_path(clip, model, vae)
        if path is None and ckpt_name and ckpt_name != AUTO:
            try:
                path = _full_path("checkpoints", ckpt_name)
            except Exception as e:
                keep("CLIP and VAE", "checkpoint %r not found: %s" % (ckpt_name, e))
                return (model, clip, vae, "\n".join(report))
        if path is None and not isinstance(clip, LunaCLIP):
            keep("CLIP and VAE", "the loader did not remember its file: choose it in ckpt_name")
            return (model, clip, vae, "\n".join(report))
        try:
            name = _name_for(path, "checkpoints") if path is not None else None
            conn = connection(endpoint(daemon, token_file))
            conn.run("ping", lambda c: c.ping())
        except (LunaDaemonError, ValueError) as e:
            keep("CLIP and VAE", str(e))
            return (model, clip, vae, "\n".join(report))
        out = []
        for what, obj, fn in (("CLIP", clip, tunnel_clip), ("VAE", vae, tunnel_vae)):
            if obj is None:
                out.append(obj)
                continue
            try:
                proxy = fn(conn, name, obj)
            except Exception as e:  # anything: the local object still works
                keep(what, str(e))
                out.append(obj)
                continue
            note = ""
            if release_local and proxy is not obj:
                note = release_local_fn(obj, proxy)
                if note:
                    _warn(note)
            report.append("%s: lunad %s (%s)%s" % (what, name, conn.endpoint, "; " + note if note else ""))
            out.append(proxy)
        return (model, out[0], out[1], "\n".join(report))


release_local_fn = release_local


class LunaDaemonStatus:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": dict(DAEMON_INPUTS)}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "status"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = "lunad's status: models, queue, caches, LoRA mode, memory."

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def status(self, daemon="", token_file=""):
        conn = connection(endpoint(daemon, token_file))
        st = conn.run("status", lambda c: c.status())
        text = format_status(st, conn.endpoint)
        return {"ui": {"text": [text]}, "result": (text,)}


def format_status(st, where):
    """A few readable lines from lunad's status reply, then the reply as JSON."""
    lines = ["lunad %s at %s, pid %s, up %.0f s, %.0f MiB resident" % (
        st.get("version", "?"), where, st.get("pid", "?"), float(st.get("uptime_s", 0)),
        float(st.get("rss_bytes", 0)) / (1 << 20))]
    q, r = st.get("queue") or {}, st.get("requests") or {}
    lines.append("queue %s/%s; served %s, failed %s, busy %s" % (q.get("depth", "?"), q.get("max", "?"),
                                                                 r.get("served", "?"), r.get("failed", "?"),
                                                                 r.get("busy", "?")))
    for m in st.get("models") or []:
        lines.append("  %s %s [%s] %s, %.1f MiB, %s requests" % (
            m.get("kind", "text"), m.get("id"), m.get("family", "-"), m.get("state"),
            float(m.get("weights_bytes", 0)) / (1 << 20), m.get("requests", 0)))
    lora = st.get("lora") or {}
    if lora:
        c = lora.get("cache") or {}
        lines.append("LoRA mode %s; cache %s entries, %s hits, %s misses, %s uploads" % (
            lora.get("mode"), c.get("entries"), c.get("hits"), c.get("misses"), c.get("uploads")))
    return "\n".join(lines) + "\n\n" + json.dumps(st, indent=1, sort_keys=True)


NODE_CLASS_MAPPINGS = {
    "LunaDaemonCLIPLoader": LunaDaemonCLIPLoader,
    "LunaDaemonVAELoader": LunaDaemonVAELoader,
    "LunaCheckpointTunnel": LunaCheckpointTunnel,
    "LunaDaemonStatus": LunaDaemonStatus,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LunaDaemonCLIPLoader": "Luna Daemon CLIP Loader",
    "LunaDaemonVAELoader": "Luna Daemon VAE Loader",
    "LunaCheckpointTunnel": "Luna Checkpoint Tunnel",
    "LunaDaemonStatus": "Luna Daemon Status",
}
