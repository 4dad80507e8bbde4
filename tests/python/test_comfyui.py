"""test_comfyui.py -- luna's ComfyUI nodes (comfyui/) against a real lunad and the PyTorch references.

ComfyUI is not installable here: tests/python/comfy_stub provides folder_paths, the
tokenizers (on ref_tokenizer.py and the real vocabulary), comfy.lora's key map and
load_lora, comfy.sd.load_lora_for_models, and node_calls.py, the call sequences of the
built-in nodes (current Comfy-Org/ComfyUI; each stand-in file names its commit). Through them:

1. the package imports with neither ComfyUI nor a daemon;
2. LunaDaemonCLIPLoader -> CLIPTextEncode / CLIPSetLastLayer / CLIPTextEncodeSDXL equal
   ref_clip.py (max |a-b| / max |b| <= 1e-4), SD1 and SDXL, weighted and multi-chunk;
3. LoraLoader (comfy.sd.load_lora_for_models -> add_patches) with stacks of kohya,
   diffusers, DoRA, LoHa and LoKr files, strengths 0.8 / -0.5 / 1.3, equal ref_lora.py's
   merge (1e-4); the clone without LoRA is unchanged; what lunad cannot apply is an error;
4. two processes sharing one daemon with different stacks on clones of one proxy;
5. LunaDaemonVAELoader -> VAEDecode / VAEEncode / VAEDecodeTiled / VAEEncodeTiled equal
   ref_vae.py (1e-4);
6. LunaCheckpointTunnel: daemon down -> the local objects with a warning; reachable and
   verified -> proxies, local copies released; CRC mismatch -> local with a warning;
7. errors name the daemon (socket) when it is down; LunaDaemonStatus shows its status;
8. textual-inversion embeddings in the prompt (needs a client that sends vectors).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STUB = HERE / "comfy_stub"
for p in (str(STUB), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import folder_paths  # noqa: E402  (the stand-in)
import make_loras  # noqa: E402
import make_models  # noqa: E402
import make_vae  # noqa: E402
import node_calls  # noqa: E402
import ref_clip  # noqa: E402
import ref_lora  # noqa: E402
import ref_tokenizer  # noqa: E402
import ref_vae  # noqa: E402
import st_io  # noqa: E402
from comfy.sd1_clip import vocab_dir  # noqa: E402
from conftest_daemon import daemon_models, start_lunad  # noqa: E402,F401

import comfyui  # noqa: E402
from comfyui import daemon as luna_daemon  # noqa: E402
from comfyui import nodes as luna_nodes  # noqa: E402

TOL = 1e-4
SD1 = dict(width=128, layers=4)
CLIP_L = dict(width=128, layers=4)
CLIP_G = dict(width=192, layers=32)
LORA_SDXL = dict(width=192, layers=32, l_width=128, l_layers=4)

PROMPTS = ["a photo of a (cat:1.2) on a ((red)) sofa",
           "masterpiece, " + ", ".join("word%d (detail:0.8)" % i for i in range(40))]  # two chunks


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def world(tmp_path_factory, luna_bin):
    """A ComfyUI-style models folder: checkpoints/demo.safetensors (luna's demo SD1
    checkpoint: CLIP-L and VAE), checkpoints/sd1.safetensors, text_encoders/clip_l and
    clip/clip_g (SDXL pair), vae/vae.safetensors, loras/*, embeddings/."""
    root = tmp_path_factory.mktemp("comfy-models")
    folder_paths.setup(root)
    r = subprocess.run([str(luna_bin), "demo-model", "--out", str(root / "checkpoints" / "demo.safetensors")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    make_models.write_model(str(root / "checkpoints" / "sd1.safetensors"), "sd1", "F16", 0, **SD1)
    make_models.write_model(str(root / "text_encoders" / "clip_l.safetensors"), "clip_l", "F16", 0, **CLIP_L)
    make_models.write_model(str(root / "clip" / "clip_g.safetensors"), "clip_g", "F16", 0, **CLIP_G)
    make_vae.write_vae(str(root / "vae" / "vae.safetensors"), layout="ldm", seed=3, ch=32)
    loras = {}
    for fam, sizes in (("sd1", SD1), ("sdxl", LORA_SDXL)):
        for i, (fmt, opts) in enumerate((("kohya", {}), ("diffusers", {}), ("dora", dict(dora_axis="out")),
                                         ("loha", {}), ("lokr", {}))):
            p = root / "loras" / ("%s-%s.safetensors" % (fam, fmt))
            make_loras.write_lora(str(p), fmt, fam, rank=4, seed=20 + i, model_seed=0, **sizes, **opts)
            loras[fam, fmt] = p
    return root, loras


@pytest.fixture
def lunad(world, start_lunad, monkeypatch):  # noqa: F811
    root, _ = world
    folder_paths.setup(root)
    d = start_lunad(models=[root])
    monkeypatch.setenv("LUNA_SOCKET", str(d.socket))
    monkeypatch.delenv("LUNA_ADDRESS", raising=False)
    monkeypatch.delenv("LUNA_MODEL_ROOTS", raising=False)
    luna_daemon.reset_connections()
    yield d
    luna_daemon.reset_connections()


def bpe():
    return ref_tokenizer.ClipBPE(vocab_dir())


def load_torch(path):
    t, _ = st_io.read(str(path))
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}


def sd1_clip(root):
    return luna_nodes.LunaDaemonCLIPLoader().load("clip_l.safetensors", "none", "sd1")[0]


def sdxl_clip():
    return luna_nodes.LunaDaemonCLIPLoader().load("clip_l.safetensors", "clip_g.safetensors", "sdxl")[0]


# ---------------------------------------------------------------- 1. import

def test_package_imports_without_comfyui_or_daemon(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import comfyui
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules, sorted(sys.modules)
        assert set(comfyui.NODE_CLASS_MAPPINGS) == {"LunaDaemonCLIPLoader", "LunaDaemonVAELoader",
                                                   "LunaCheckpointTunnel", "LunaDaemonStatus"}
        for cls in comfyui.NODE_CLASS_MAPPINGS.values():
            assert cls.CATEGORY == "luna"
        print("ok")
    """)
    env = dict(os.environ, LUNA_SOCKET=str(tmp_path / "nobody.sock"))
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- 2. text encoders

@pytest.mark.parametrize("prompt", PROMPTS)
def test_clip_text_encode_sd1(world, lunad, prompt):
    root, _ = world
    clip = sd1_clip(root)
    assert "clip_l.transformer.text_model.encoder.layers.3.mlp.fc2.weight" in clip.cond_stage_model.state_dict()
    enc = ref_clip.load([str(root / "text_encoders" / "clip_l.safetensors")])
    want_tokens = ref_tokenizer.tokenize_family(bpe(), prompt, "sd1")
    got_tokens = clip.tokenize(prompt)
    assert [[list(map(float, t)) for t in c] for c in got_tokens["l"]] == \
        [[list(map(float, t)) for t in c] for c in want_tokens["l"]]
    (cond_list,) = node_calls.clip_text_encode(clip, prompt)
    [[cond, extra]] = cond_list
    ref_cond, ref_pooled = ref_clip.encode_loaded(enc, want_tokens)
    assert cond.dtype == torch.float32 and cond.device.type == "cpu" and list(cond.shape) == list(ref_cond.shape)
    assert rel(cond, ref_cond) <= TOL and rel(extra["pooled_output"], ref_pooled) <= TOL
    # CLIPSetLastLayer(-2) on a clone; the original keeps its layer
    (skip,) = node_calls.clip_set_last_layer(clip, -2)
    [[cond2, _]] = node_calls.clip_text_encode(skip, prompt)[0]
    ref2, _ = ref_clip.encode_loaded(enc, want_tokens, clip_layer=-2)
    assert rel(cond2, ref2) <= TOL and rel(cond2, ref_cond) > 1e-3
    assert clip.layer_idx is None
    # the other return forms
    c, p = clip.encode_from_tokens(want_tokens, return_pooled=True)
    d = clip.encode_from_tokens(want_tokens, return_dict=True)
    assert rel(c, ref_cond) <= TOL and rel(p, ref_pooled) <= TOL and rel(d["pooled_output"], ref_pooled) <= TOL
    assert rel(clip.encode(prompt), ref_cond) <= TOL


def test_clip_text_encode_sdxl_with_size(world, lunad):
    root, _ = world
    clip = sdxl_clip()
    sd = clip.cond_stage_model.state_dict()
    assert list(sd["clip_g.transformer.text_projection.weight"].shape) == [192, 192]
    assert sd["clip_g.transformer.text_projection.weight"].device.type == "meta"
    text_g, text_l = PROMPTS[1], "a (small:1.3) cat"
    [[cond, extra]] = node_calls.clip_text_encode_sdxl(clip, 1024, 768, 0, 8, 1024, 768, text_g, text_l)[0]
    assert {k: extra[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == \
        {"width": 1024, "height": 768, "crop_w": 0, "crop_h": 8, "target_width": 1024, "target_height": 768}
    b = bpe()
    g = ref_tokenizer.tokenize_prompt(b, text_g, 0)
    l_ = ref_tokenizer.tokenize_prompt(b, text_l, ref_tokenizer.EOS_ID)
    empty_l = ref_tokenizer.tokenize_prompt(b, "", ref_tokenizer.EOS_ID)
    while len(l_) < len(g):
        l_ += empty_l
    enc = ref_clip.load([str(root / "text_encoders" / "clip_l.safetensors"), str(root / "clip" / "clip_g.safetensors")])
    ref_cond, ref_pooled = ref_clip.encode_loaded(enc, {"l": l_, "g": g})
    assert list(cond.shape) == [1, 77 * len(g), 128 + 192] and len(g) >= 2
    assert rel(cond, ref_cond) <= TOL and rel(extra["pooled_output"], ref_pooled) <= TOL
    with pytest.raises(comfyui.LunaDaemonError, match="unprojected"):
        clip.encode_from_tokens_scheduled(clip.tokenize("x"), unprojected=True)


# ---------------------------------------------------------------- 3. LoRA

@pytest.mark.parametrize("family,stack", [
    ("sd1", [("kohya", 0.8)]),
    ("sd1", [("diffusers", 1.0), ("dora", -0.5), ("loha", 1.3)]),
    ("sd1", [("lokr", 0.7), ("kohya", 0.0)]),
    ("sdxl", [("kohya", 0.8), ("loha", -0.5)]),
    ("sdxl", [("dora", 1.0), ("lokr", 1.2)]),
])
def test_lora_loader_chain(world, lunad, family, stack):
    root, loras = world
    base = sd1_clip(root) if family == "sd1" else sdxl_clip()
    clip = base
    for fmt, s in stack:
        (clip,) = node_calls.lora_loader_clip(clip, load_torch(loras[family, fmt]), s)
    prompt = PROMPTS[0]
    tokens = base.tokenize(prompt)
    [[cond, extra]] = node_calls.clip_text_encode(clip, prompt)[0]
    paths = [str(root / "text_encoders" / "clip_l.safetensors")]
    if family == "sdxl":
        paths.append(str(root / "clip" / "clip_g.safetensors"))
    enc = ref_clip.load(paths)
    applied = [(str(loras[family, f]), s) for f, s in stack if s != 0]
    merged = ref_lora.apply_stack(enc, applied, family) if applied else enc
    ref_cond, ref_pooled = ref_clip.encode_loaded(merged, tokens)
    assert rel(cond, ref_cond) <= TOL and rel(extra["pooled_output"], ref_pooled) <= TOL
    assert len(clip.stack) == len(applied)
    # the clone chain left the base proxy without LoRAs
    base_cond, _ = ref_clip.encode_loaded(enc, tokens)
    [[c0, _]] = node_calls.clip_text_encode(base, prompt)[0]
    assert not base.stack and rel(c0, base_cond) <= TOL
    if applied:
        assert rel(cond, base_cond) > 1e-3


def test_lora_image_is_deterministic_and_cached(world, lunad):
    root, loras = world
    clip = sd1_clip(root)
    sd = load_torch(loras["sd1", "kohya"])
    a = node_calls.lora_loader_clip(clip, sd, 0.8)[0]
    b = node_calls.lora_loader_clip(clip, load_torch(loras["sd1", "kohya"]), 0.8)[0]
    assert a.stack[0].identity == b.stack[0].identity and a.stack[0].data == b.stack[0].data
    node_calls.clip_text_encode(a, "one")
    node_calls.clip_text_encode(b, "two")
    with lunad.client() as c:
        entries = [e for e in c.lora_list()["loras"] if e["id"] == a.stack[0].identity]
    assert len(entries) == 1 and entries[0]["source"] == "upload"


def test_lora_unsupported_is_an_error(world, lunad):
    root, loras = world
    clip = sd1_clip(root)
    sd = load_torch(loras["sd1", "kohya"])
    prefix = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    with_mid = dict(sd)
    with_mid[prefix + ".lora_mid.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(comfyui.LunaDaemonError, match="mid"):
        node_calls.lora_loader_clip(clip, with_mid, 1.0)
    emb = {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.lora_up.weight": torch.zeros(49408, 2),
           "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.lora_down.weight": torch.zeros(2, 128)}
    with pytest.raises(comfyui.LunaDaemonError, match="token_embedding"):
        node_calls.lora_loader_clip(clip, emb, 1.0)
    from comfy import lora as comfy_lora
    loaded = comfy_lora.load_lora(sd, comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    with pytest.raises(comfyui.LunaDaemonError, match="strength_model"):
        clip.clone().add_patches(loaded, 1.0, 0.5)
    with pytest.raises(comfyui.LunaDaemonError, match="set"):
        clip.clone().add_patches({"clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
                                  ("set", (torch.zeros(512, 128),))}, 1.0)
    # keys the model does not have are not taken, as ComfyUI's add_patches does
    assert clip.clone().add_patches({"clip_g.transformer.text_projection.weight": ("diff", (torch.zeros(1),))}) == []


# ---------------------------------------------------------------- 4. two processes

def test_two_processes_with_different_stacks(world, lunad, tmp_path):
    root, loras = world
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[3]]
        import folder_paths, node_calls, st_io
        folder_paths.setup(sys.argv[4])
        from comfyui import nodes
        base = nodes.LunaDaemonCLIPLoader().load("clip_l.safetensors", "none", "sd1")[0]
        clip = base
        for spec in sys.argv[6:]:
            path, s = spec.rsplit(":", 1)
            t, _ = st_io.read(path)
            clip = node_calls.lora_loader_clip(clip, {k: torch.from_numpy(np.ascontiguousarray(v))
                                                      for k, v in t.items()}, float(s))[0]
        outs = []
        for i in range(5):
            [[cond, _]] = node_calls.clip_text_encode(clip if i % 2 == 0 else base.clone(), "a red (cat:1.1)")[0]
            outs.append(cond.numpy())
        np.save(sys.argv[5], np.stack(outs))
    """)
    stacks = {"p1": [(loras["sd1", "kohya"], 0.9)], "p2": [(loras["sd1", "loha"], -0.7), (loras["sd1", "dora"], 1.0)]}
    procs = {}
    for name, stack in stacks.items():
        args = [sys.executable, "-c", script, str(STUB), str(ROOT), str(HERE), str(root), str(tmp_path / (name + ".npy"))]
        args += ["%s:%s" % (p, s) for p, s in stack]
        procs[name] = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=dict(os.environ, LUNA_SOCKET=str(lunad.socket)))
    enc = ref_clip.load([str(root / "text_encoders" / "clip_l.safetensors")])
    tokens = ref_tokenizer.tokenize_family(bpe(), "a red (cat:1.1)", "sd1")
    base_ref, _ = ref_clip.encode_loaded(enc, tokens)
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        got = np.load(tmp_path / (name + ".npy"))
        want, _ = ref_clip.encode_loaded(ref_lora.apply_stack(enc, [(str(a), s) for a, s in stacks[name]], "sd1"),
                                         tokens)
        for i in range(5):
            assert rel(got[i], want if i % 2 == 0 else base_ref) <= TOL, (name, i)


# ---------------------------------------------------------------- 5. VAE

def test_vae_nodes(world, lunad):
    root, _ = world
    (vae,) = luna_nodes.LunaDaemonVAELoader().load("vae.safetensors")
    ref = ref_vae.load(str(root / "vae" / "vae.safetensors"))
    assert vae.latent_channels == 4 and vae.spacial_compression_decode() == 8
    assert vae.memory_used_decode((1, 4, 128, 128), torch.float32) < (64 << 20)
    g = torch.Generator().manual_seed(5)
    lat = torch.randn((2, 4, 12, 10), generator=g)
    (img,) = node_calls.vae_decode(vae, {"samples": lat})
    want = ref.decode(lat)
    assert img.dtype == torch.float32 and img.device.type == "cpu" and list(img.shape) == [2, 96, 80, 3]
    assert float((img - want).abs().max()) <= TOL
    (tiled,) = node_calls.vae_decode_tiled(vae, {"samples": lat}, tile_size=64, overlap=16)
    want_t = ref.decode_tiled(lat, 8, 8, 2)
    assert float((tiled - want_t).abs().max()) <= TOL
    pixels = torch.rand((1, 70, 84, 4), generator=g)  # RGBA and not a multiple of 8, as a loaded image may be
    z = node_calls.vae_encode(vae, pixels)[0]["samples"]
    want_z = ref.encode(pixels[:, :, :, :3])
    assert list(z.shape) == [1, 4, 8, 10] and rel(z, want_z) <= TOL
    (enc_t,) = node_calls.vae_encode_tiled(vae, pixels, tile_size=64, overlap=16)
    want_zt = ref.encode_tiled(pixels[:, :, :, :3], 64, 64, 16)
    assert rel(enc_t["samples"], want_zt) <= TOL
    with pytest.raises(comfyui.LunaDaemonError, match="holds no weights"):
        vae.get_sd()


# ---------------------------------------------------------------- 6. the tunnel

def load_checkpoint_clip_patcher(*a):  # named as comfy.sd's reload factory for a checkpoint's CLIP
    return None


class FakePatcher:
    """ComfyUI's load_checkpoint_guess_config sets clip.patcher.cached_patcher_init =
    (load_checkpoint_clip_patcher, (ckpt_path, embedding_directory, model_options, te_model_options))."""

    def __init__(self, path):
        self.patches = {}
        self.forced_hooks = None
        if path is not None:
            self.cached_patcher_init = (load_checkpoint_clip_patcher, (path, None, {}, {}))


class FakeComfyCLIP:
    """What comfy.sd.CLIP looks like to the tunnel: cond_stage_model.state_dict() with
    ComfyUI's names (fp16 weights, a square projection ComfyUI builds even for SD1), a
    tokenizer, a patcher remembering the checkpoint path."""

    def __init__(self, ckpt, weights_from, remember=True):
        enc = ref_clip.load_file(str(weights_from))[0]
        sd = {}
        for k, v in enc.w.items():
            if k != "text_projection.weight":
                sd["clip_l.transformer.text_model." + k] = v.half()
        sd["clip_l.transformer.text_projection.weight"] = torch.eye(enc.width, dtype=torch.float16)
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.zeros(4))
        module.state_dict = lambda *a, **k: dict(sd)
        self.cond_stage_model = module
        from comfy.sd1_clip import SD1Tokenizer
        self.tokenizer = SD1Tokenizer()
        self.patcher = FakePatcher(str(ckpt) if remember else None)
        self.layer_idx = None


class FakeComfyVAE:
    def __init__(self, path):
        self.ref = ref_vae.load(str(path))
        self.latent_channels = 4
        self.upscale_ratio = self.downscale_ratio = 8
        self.vae_dtype = torch.float32
        self.first_stage_model = torch.nn.Conv2d(1, 1, 1)
        self.patcher = FakePatcher(None)

    def decode(self, z):
        return self.ref.decode(z)


def test_tunnel_passes_through_when_daemon_is_down(world, monkeypatch, tmp_path, capsys):
    root, _ = world
    folder_paths.setup(root)
    monkeypatch.setenv("LUNA_SOCKET", str(tmp_path / "no-lunad.sock"))
    luna_daemon.reset_connections()
    ckpt = root / "checkpoints" / "demo.safetensors"
    clip, vae, model = FakeComfyCLIP(ckpt, ckpt), FakeComfyVAE(ckpt), object()
    m, c, v, report = luna_nodes.LunaCheckpointTunnel().tunnel(model, clip, vae)
    assert m is model and c is clip and v is vae
    assert "LOCAL" in report and "no-lunad.sock" in report
    assert "no-lunad.sock" in capsys.readouterr().out
    # a loader node fails instead, naming the socket
    with pytest.raises(comfyui.LunaDaemonError, match="no-lunad.sock"):
        luna_nodes.LunaDaemonCLIPLoader().load("clip_l.safetensors", "none", "sd1")


def test_tunnel_proxies_verified_weights(world, lunad):
    root, _ = world
    ckpt = root / "checkpoints" / "demo.safetensors"
    clip, vae, model = FakeComfyCLIP(ckpt, ckpt), FakeComfyVAE(ckpt), object()
    m, c, v, report = luna_nodes.LunaCheckpointTunnel().tunnel(model, clip, vae)
    assert m is model and isinstance(c, comfyui.LunaCLIP) and isinstance(v, comfyui.LunaVAE), report
    assert c.model == "checkpoints/demo.safetensors" and "LOCAL" not in report
    # the local copies were released (weights on the meta device)
    assert clip.cond_stage_model.w.device.type == "meta" and vae.first_stage_model.weight.device.type == "meta"
    prompt = "a photo of a (cat:1.2)"
    [[cond, extra]] = node_calls.clip_text_encode(c, prompt)[0]
    enc = ref_clip.load([str(ckpt)])
    ref_cond, ref_pooled = ref_clip.encode_loaded(enc, ref_tokenizer.tokenize_family(bpe(), prompt, "sd1"))
    assert rel(cond, ref_cond) <= TOL and rel(extra["pooled_output"], ref_pooled) <= TOL
    lat = torch.randn((1, 4, 6, 6), generator=torch.Generator().manual_seed(1))
    (img,) = node_calls.vae_decode(v, {"samples": lat})
    assert float((img - vae.ref.decode(lat)).abs().max()) <= TOL
    # a second run (the loader's outputs cached by ComfyUI) gets the proxies again
    _, c2, v2, report2 = luna_nodes.LunaCheckpointTunnel().tunnel(model, clip, vae)
    assert isinstance(c2, comfyui.LunaCLIP) and isinstance(v2, comfyui.LunaVAE), report2


def test_tunnel_checkpoint_name_input_and_mismatch(world, lunad, capsys):
    root, _ = world
    ckpt = root / "checkpoints" / "demo.safetensors"
    other = root / "checkpoints" / "sd1.safetensors"
    # the loader remembers nothing: without ckpt_name the objects stay local
    clip, vae = FakeComfyCLIP(ckpt, ckpt, remember=False), FakeComfyVAE(ckpt)
    _, c, v, report = luna_nodes.LunaCheckpointTunnel().tunnel(None, clip, vae)
    assert c is clip and v is vae and "ckpt_name" in report
    _, c, v, report = luna_nodes.LunaCheckpointTunnel().tunnel(None, clip, vae, ckpt_name="demo.safetensors",
                                                              release_local=False)
    assert isinstance(c, comfyui.LunaCLIP) and isinstance(v, comfyui.LunaVAE), report
    # CLIP weights of another model under the checkpoint's name: CRC mismatch -> local, with a warning
    clip2, vae2 = FakeComfyCLIP(ckpt, other), FakeComfyVAE(root / "vae" / "vae.safetensors")
    _, c, v, report = luna_nodes.LunaCheckpointTunnel().tunnel(None, clip2, vae2)
    assert c is clip2 and v is vae2, report
    assert "CLIP: LOCAL" in report and "weights differ" in report and "VAE: LOCAL" in report
    assert "WARNING" in capsys.readouterr().out
    assert clip2.cond_stage_model.w.device.type == "cpu"


# ---------------------------------------------------------------- 7. status, errors

def test_status_node_and_failure_mid_run(world, lunad):
    root, _ = world
    out = luna_nodes.LunaDaemonStatus().status()
    text = out["result"][0]
    assert text.startswith("lunad ") and str(lunad.socket) in text and out["ui"]["text"] == [text]
    clip = sd1_clip(root)
    lunad.stop()
    with pytest.raises(comfyui.LunaDaemonError, match=str(lunad.socket)):
        node_calls.clip_text_encode(clip, "a cat")


def test_reconnects_after_daemon_restart(world, start_lunad, monkeypatch, tmp_path):  # noqa: F811
    root, _ = world
    folder_paths.setup(root)
    sock = tmp_path / "l.sock"
    d = start_lunad(models=[root], socket_path=sock)
    monkeypatch.setenv("LUNA_SOCKET", str(sock))
    luna_daemon.reset_connections()
    clip = luna_nodes.LunaDaemonCLIPLoader().load("clip_l.safetensors", "none", "sd1")[0]
    a = node_calls.clip_text_encode(clip, "a cat")[0][0][0]
    d.stop()
    d2 = start_lunad(models=[root], socket_path=sock)
    b = node_calls.clip_text_encode(clip, "a cat")[0][0][0]
    assert torch.equal(a, b) and d2.alive()
    luna_daemon.reset_connections()


# ---------------------------------------------------------------- 8. embeddings

def test_textual_inversion_embedding(world, lunad):
    root, _ = world
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((2, 128)).astype(np.float32) * 0.02
    st_io.write(str(root / "embeddings" / "myemb.safetensors"), {"clip_l": vecs})
    clip = sd1_clip(root)
    prompt = "a photo of embedding:myemb cat"
    tokens = clip.tokenize(prompt)
    slots = [t for t in tokens["l"][0] if not isinstance(t[0], int)]
    assert len(slots) == 2 and all(t[0].shape == (128,) for t in slots)
    try:
        [[cond, _]] = node_calls.clip_text_encode(clip, prompt)[0]
    except (TypeError, comfyui.LunaDaemonError) as e:
        text = str(e).lower()
        if "embedding" in text or "json" in text or "serializable" in text or "must be an integer" in text:
            pytest.skip("this lunaclient / lunad does not send textual-inversion vectors yet: %s" % e)
        raise
    # reference: the vectors as extra rows of the token table, their slots pointing at them
    enc = ref_clip.load([str(root / "text_encoders" / "clip_l.safetensors")])
    e = enc["l"]
    table = e.w["embeddings.token_embedding.weight"]
    e.w["embeddings.token_embedding.weight"] = torch.cat([table, torch.from_numpy(vecs)], 0)
    ids, k = [], 0
    for t in tokens["l"][0]:
        if isinstance(t[0], int):
            ids.append([t[0], t[1]])
        else:
            ids.append([table.shape[0] + k, t[1]])
            k += 1
    ref_cond, _ = ref_clip.encode_loaded(enc, {"l": [ids]})
    assert rel(cond, ref_cond) <= TOL


# ---------------------------------------------------------------- 9. ComfyUI's surface (stand-in fidelity)

def test_lora_key_map_forms(world, lunad):
    from comfy import lora as comfy_lora
    root, _ = world
    m = comfy_lora.model_lora_keys_clip(sd1_clip(root).cond_stage_model, {})
    q = "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    for k in ("lora_te_text_model_encoder_layers_1_self_attn_q_proj", "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
              "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
              "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj"):
        assert m[k] == q, k
    assert m["lora_te1_text_projection"] == "clip_l.transformer.text_projection.weight"
    assert not any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in m)
    m = comfy_lora.model_lora_keys_clip(sdxl_clip().cond_stage_model, {})
    g = "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"
    assert m["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == g
    assert m["text_encoder_2.text_model.encoder.layers.31.mlp.fc2"] == g
    assert m["lora_te1_text_model_encoder_layers_3_mlp_fc1"].startswith("clip_l.")
    assert m["lora_te_text_model_encoder_layers_3_mlp_fc1"].startswith("clip_l.")
    assert m["lora_te2_text_projection"] == m["lora_prior_te_text_projection"] == "clip_g.transformer.text_projection.weight"


def test_load_lora_tries_every_kind():
    from comfy import lora as comfy_lora
    from comfy.weight_adapter import LoRAAdapter
    t = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    x = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    up, down, d = torch.ones(8, 2), torch.ones(2, 4), torch.zeros(8, 4)
    got = comfy_lora.load_lora({x + ".lora_B.weight": up, x + ".lora_A.weight": down, x + ".alpha": torch.tensor(2.0)},
                               {x: t})
    assert isinstance(got[t], LoRAAdapter) and got[t].weights[2] == 2.0 and got[t].weights[0] is up
    # a diff next to a LoRA wins, as ComfyUI checks the plain patches after every adapter
    got = comfy_lora.load_lora({x + ".lora_up.weight": up, x + ".lora_down.weight": down, x + ".diff": d}, {x: t})
    assert got[t][0] == "diff" and got[t][1][0] is d


def test_lora_metadata_and_zero_strength(world, lunad, caplog):
    root, loras = world
    clip = sd1_clip(root)
    sd = load_torch(loras["sd1", "kohya"])
    (a,) = node_calls.lora_loader_clip(clip, sd, 0.8, lora_metadata={"ss_network_dim": "4"})
    assert a.patcher.get_attachment("lora_metadata") == {"ss_network_dim": "4"} and len(a.stack) == 1
    assert clip.patcher.get_attachment("lora_metadata") is None
    # LoraLoader with a model strength and strength_clip 0 still patches the CLIP, at 0
    import comfy.sd
    with caplog.at_level("WARNING"):
        _, z = comfy.sd.load_lora_for_models(None, clip, sd, 0.7, 0.0)
    assert z is not clip and not z.stack and z.patcher.patches and "NOT LOADED" not in caplog.text
    [[c0, _]] = node_calls.clip_text_encode(z, "a cat")[0]
    [[c1, _]] = node_calls.clip_text_encode(clip, "a cat")[0]
    assert torch.equal(c0, c1)
    with pytest.raises(comfyui.LunaDaemonError, match="no weights"):
        a.get_key_patches()


def test_schedule_flag_without_hooks_encodes(world, lunad):
    root, _ = world
    clip = sd1_clip(root).clone()
    clip.use_clip_schedule = True
    [[cond, extra]] = node_calls.clip_text_encode(clip, "a cat")[0]
    assert cond.shape[1] == 77 and "pooled_output" in extra
    clip.patcher.forced_hooks = object()
    with pytest.raises(comfyui.LunaDaemonError, match="hooks"):
        node_calls.clip_text_encode(clip, "a cat")


def test_missing_embedding_is_dropped(world):
    from comfy.sd1_clip import SD1Tokenizer
    root, _ = world
    tok = SD1Tokenizer(embedding_directory=[str(root / "embeddings")])
    got = tok.tokenize_with_weights("a embedding:nosuchthing cat")["l"][0]
    want = ref_tokenizer.tokenize_family(bpe(), "a cat", "sd1")["l"][0]
    assert [list(map(float, t)) for t in got] == [list(map(float, t)) for t in want]
    ids = tok.tokenize_with_weights("a (red:1.2) cat", return_word_ids=True)["l"][0]
    assert ids[0][2] == 0 and ids[1][2] == 1 and ids[2][2] == 2 and ids[-1][2] == 0


def test_remembered_path_forms():
    def load_checkpoint_guess_config(*a):
        pass

    def load_clip_model_patcher(*a):
        pass

    def load_vae_patcher(*a):
        pass

    class H:
        def __init__(self, init):
            self.cached_patcher_init = init

    class Obj:
        def __init__(self, init):
            self.patcher = H(init)

    model = H((load_checkpoint_guess_config, ("/m/ckpt.safetensors", False, False, False, None, True, {}, {}), 0))
    clip = Obj((load_clip_model_patcher, (["/m/clip_l.safetensors"], None, 1, {})))
    vae = Obj((load_vae_patcher, ("/m/vae.safetensors", None, None)))
    assert luna_nodes.remembered_path(clip, model, vae) == "/m/ckpt.safetensors"
    assert luna_nodes.remembered_path(clip, None, vae) is None
    clip = Obj((load_checkpoint_clip_patcher, ("/m/other.safetensors", None, {}, {})))
    assert luna_nodes.remembered_path(clip, model, vae) == "/m/other.safetensors"


def test_vae_surface(world, lunad):
    root, _ = world
    (vae,) = luna_nodes.LunaDaemonVAELoader().load("vae.safetensors")
    ref = ref_vae.load(str(root / "vae" / "vae.safetensors"))
    lat = torch.randn((1, 4, 6, 5), generator=torch.Generator().manual_seed(9))
    # a 5-D latent to an image VAE: frame 0, as comfy.sd.VAE.decode does
    img = vae.decode(torch.stack([lat, lat + 1], 2))
    assert float((img - ref.decode(lat)).abs().max()) <= TOL
    assert vae.spacial_compression_encode() == 8 and vae.temporal_compression_decode() is None
    assert vae.latent_dim == 2 and vae.downscale_index_formula is None and not vae.is_dynamic()
    px = torch.rand((1, 19, 21, 4))
    assert list(vae.vae_encode_crop_pixels(px).shape) == [1, 16, 16, 3]
    with pytest.raises(comfyui.LunaDaemonError, match="vae_options"):
        vae.decode(lat, vae_options={"x": 1})
