"""clip_proxy.py -- LunaCLIP: a stand-in for comfy.sd.CLIP whose text encoders run in lunad.

Only the tokenizer lives in this process (ComfyUI's own SD1Tokenizer / SDXLTokenizer, so
weights syntax, chunking and `embedding:name` behave exactly as in ComfyUI). The encoders
are lunad's: encode_from_tokens() sends the tokens, the clip layer and the LoRA stack.

The LoRA stack is a recipe carried by each clone. add_patches() (what
comfy.sd.load_lora_for_models calls, with what comfy.lora.load_lora built against
cond_stage_model.state_dict()) checks the patches, turns them into one safetensors image
in a format lunad parses (lora_image.py) and appends (identity, strength) to the clone's
stack; lunad gets the image only when it lacks that identity (lunaclient.LoraImage).
One add_patches() call is one entry of the stack: ComfyUI applies the patches of a key in
the order they were added, and so does lunad, entry after entry.

cond_stage_model.state_dict() has ComfyUI's real key names and shapes, on the "meta"
device (no memory, no values), so model_lora_keys_clip and load_lora work unchanged.
What the proxy cannot do raises LunaDaemonError (hooks, a model merge or get_key_patches,
get_sd, bypass LoRA injections, unprojected SDXL pooled output, patch kinds lunad does not
apply), never a silently different result. The surface follows comfy.sd.CLIP and
ModelPatcher of Comfy-Org/ComfyUI (comfy/sd.py at 033046cc4fac82d954c6daedccf1c8128433c4f1).
A LoRA added at strength 0 (LoraLoader with strength_clip 0 and a model strength) is
checked and recorded on the patcher like any other, but sends nothing to lunad.
"""

import collections
import numbers

import numpy as np

from . import lora_image
from .daemon import LunaDaemonError, lunaclient

MAX_LORAS = 16


def _torch():
    import torch
    return torch


class _NoAttr:
    """A proxy's missing attribute: an AttributeError that says why."""

    _what = "proxy"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError("the Luna %s has no '%s': its model runs in lunad, and this ComfyUI feature needs "
                             "the model in this process" % (self._what, name))


class LunaTextModel(_NoAttr):
    """cond_stage_model of a LunaCLIP: key names and shapes, no weights."""

    _what = "proxy text encoder (cond_stage_model)"

    def __init__(self, key_shapes, family):
        self._key_shapes = collections.OrderedDict((k, tuple(s)) for k, s in key_shapes)
        self.family = family
        self.options = {}

    def state_dict(self, *args, **kwargs):
        torch = _torch()
        return collections.OrderedDict((k, torch.empty(s, dtype=torch.float16, device="meta"))
                                       for k, s in self._key_shapes.items())

    def keys(self):
        return list(self._key_shapes)

    def reset_clip_options(self):
        self.options = {}

    def set_clip_options(self, options):
        self.options.update(options)

    def encode_token_weights(self, token_weight_pairs):
        raise LunaDaemonError("the Luna proxy text encoder cannot encode by itself: use the CLIP object's "
                              "encode_from_tokens (the LoRA stack lives on the CLIP clone)")


class LunaPatcher(_NoAttr):
    """clip.patcher of a LunaCLIP: the patches recorded per key, nothing to load."""

    _what = "proxy CLIP's patcher"

    def __init__(self, model, patches=None, attachments=None):
        self.model = model
        self.patches = {k: list(v) for k, v in (patches or {}).items()}
        self.attachments = dict(attachments or {})
        self.forced_hooks = None
        self.hook_mode = None
        self.is_clip = True
        self.model_options = {"transformer_options": {}}
        self.size = 0

    def clone(self, disable_dynamic=False):
        return LunaPatcher(self.model, self.patches, self.attachments)

    def is_dynamic(self):
        return False

    def set_attachments(self, key, attachment):
        self.attachments[key] = attachment

    def get_attachment(self, key):
        return self.attachments.get(key, None)

    def remove_attachments(self, key):
        self.attachments.pop(key, None)

    def set_injections(self, key, injections):
        raise LunaDaemonError("injections (%s: bypass LoRA and the like) change the forward pass, which runs in "
                              "lunad: not supported by the Luna proxy CLIP" % key)

    def model_size(self):
        return 0

    def loaded_size(self):
        return 0

    def is_clone(self, other):
        return isinstance(other, LunaPatcher) and other.model is self.model

    def get_key_patches(self, filter_prefix=None):
        raise LunaDaemonError("get_key_patches returns the weights with their patches (model merging); the Luna "
                              "proxy CLIP holds no weights (they are in lunad)")


class StackEntry:
    """One add_patches() call: its image's identity, the image, strength, keys."""

    __slots__ = ("identity", "data", "strength", "keys")

    def __init__(self, identity, data, strength, keys):
        self.identity, self.data, self.strength, self.keys = identity, data, strength, keys

    def __repr__(self):
        return "StackEntry(%s..., %g, %d keys)" % (self.identity[:12], self.strength, len(self.keys))


def _wire_slot(t, where):
    tok, w = t[0], t[1]
    if isinstance(tok, (bool, np.bool_)):
        raise LunaDaemonError("%s: token %r is a bool" % (where, tok))
    if isinstance(tok, numbers.Integral):
        return [int(tok), float(w)]
    torch = _torch()
    if isinstance(tok, torch.Tensor):
        tok = tok.detach().to("cpu", torch.float32).numpy()
    if isinstance(tok, np.ndarray):
        if tok.ndim == 1 and np.issubdtype(tok.dtype, np.floating):
            return [np.ascontiguousarray(tok, dtype=np.float32), float(w)]
        raise LunaDaemonError("%s: an embedding slot of shape %s (lunad takes 1-D vectors)" % (where, list(tok.shape)))
    raise LunaDaemonError("%s: a token slot of type %s (%r) is not one lunad takes (ids and textual-inversion "
                          "vectors)" % (where, type(tok).__name__, tok if isinstance(tok, dict) else ""))


def wire_tokens(tokens, family):
    """ComfyUI's tokenize() result as Client.encode takes it: {"l": [[[id or vector,
    weight], ...77], ...], "g": ...}; word ids dropped."""
    if not isinstance(tokens, dict):
        raise LunaDaemonError("tokens are a dict {'l': chunks[, 'g': chunks]}, not %s" % type(tokens).__name__)
    want = {"l"} if family == "sd1" else {"l", "g"}
    if set(tokens) != want:
        raise LunaDaemonError("tokens for encoders %s, but this %s model has %s" % (sorted(tokens), family,
                                                                                  sorted(want)))
    return {k: [[_wire_slot(t, "tokens['%s'][%d][%d]" % (k, i, j)) for j, t in enumerate(chunk)]
                for i, chunk in enumerate(chunks)]
            for k, chunks in tokens.items()}


def make_tokenizer(family, embedding_directory=None):
    """ComfyUI's tokenizer for the family (imported here: ComfyUI must be loaded)."""
    if family == "sd1":
        from comfy.sd1_clip import SD1Tokenizer as T
    elif family == "sdxl":
        from comfy.sdxl_clip import SDXLTokenizer as T
    else:
        raise LunaDaemonError("lunad serves text encoders of type sd1 or sdxl, not %r" % (family,))
    try:
        return T(embedding_directory=embedding_directory, tokenizer_data={})
    except TypeError:  # ComfyUI before tokenizer_data
        return T(embedding_directory=embedding_directory)


class LunaCLIP(_NoAttr):
    """A drop-in for comfy.sd.CLIP served by lunad (see the module docstring).

    conn       daemon.Connection
    model      lunad's name of the model: one path or a list (clip_l + clip_g files)
    family     "sd1" or "sdxl"
    key_shapes [(state-dict key, shape)] of ComfyUI's cond_stage_model
    tokenizer  a ComfyUI tokenizer object (tokenize_with_weights)
    """

    _what = "proxy CLIP"

    def __init__(self, conn, model, family, key_shapes=None, tokenizer=None, no_init=False):
        if no_init:
            return
        self.conn = conn
        self.model = model
        self.family = family
        self.cond_stage_model = LunaTextModel(key_shapes, family)
        self.tokenizer = tokenizer
        self.patcher = LunaPatcher(self.cond_stage_model)
        self.layer_idx = None
        self.tokenizer_options = {}
        self.use_clip_schedule = False
        self.apply_hooks_to_conds = None
        self.stack = []
        self.last_info = None

    def __repr__(self):
        return "LunaCLIP(%s %r at %s, %d LoRAs, layer %s)" % (self.family, self.model, self.conn.endpoint,
                                                            len(self.stack), self.layer_idx)

    # ---- the CLIP interface ------------------------------------------------------

    def clone(self, disable_dynamic=False):
        n = LunaCLIP(None, None, None, no_init=True)
        n.conn, n.model, n.family = self.conn, self.model, self.family
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.patcher = self.patcher.clone(disable_dynamic=disable_dynamic)
        n.layer_idx = self.layer_idx
        n.tokenizer_options = dict(self.tokenizer_options)
        n.use_clip_schedule = self.use_clip_schedule
        n.apply_hooks_to_conds = self.apply_hooks_to_conds
        n.stack = list(self.stack)
        n.last_info = None
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Take the patches whose keys this model has; returns the list of keys taken.
        strength_patch is LoraLoader's strength_clip; strength_model other than 1.0
        (a pre-multiplication of the weight, used by model merging) is refused."""
        if strength_model != 1.0:
            raise LunaDaemonError("add_patches with strength_model %r: scaling the base weights (model merging) "
                                  "is not something lunad does" % (strength_model,))
        if isinstance(strength_patch, bool) or not isinstance(strength_patch, numbers.Real) or \
                not np.isfinite(float(strength_patch)):
            raise LunaDaemonError("add_patches: strength %r is not a finite number" % (strength_patch,))
        have = set(self.cond_stage_model.keys())
        taken, out = {}, []
        for k, patch in patches.items():
            if isinstance(k, str):
                key, extra = k, ()
            else:
                key, extra = k[0], tuple(k[1:])
            if key not in have:
                continue
            if any(e is not None for e in extra):
                raise LunaDaemonError("%s: a patch with an offset or a weight function, which lunad does not apply"
                                      % key)
            try:
                lora_image.check_patch(key, patch)
            except lora_image.PatchError as e:
                raise LunaDaemonError("LoRA on the Luna proxy CLIP: %s" % e) from None
            taken[key] = patch
            out.append(k)
        if not taken:
            return out
        if float(strength_patch) != 0.0:  # W + 0 * dW is W for every kind lunad applies: nothing to send
            self._push(taken, float(strength_patch))
        for key, patch in taken.items():
            self.patcher.patches.setdefault(key, []).append((float(strength_patch), patch, 1.0, None, None))
        return out

    def _push(self, taken, strength):
        if len(self.stack) >= MAX_LORAS:
            raise LunaDaemonError("a LoRA stack on lunad has at most %d entries; this would be %d"
                                  % (MAX_LORAS, len(self.stack) + 1))
        data = lora_image.build_image(taken)
        ident = lunaclient().lora.identity_of_image(data, "LoRA patches")
        self.stack.append(StackEntry(ident, data, strength, tuple(sorted(taken))))

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def set_tokenizer_option(self, option_name, value):
        self.tokenizer_options[option_name] = value

    def tokenize(self, text, return_word_ids=False, **kwargs):
        options = kwargs.get("tokenizer_options", {})
        if self.tokenizer_options:
            options = {**self.tokenizer_options, **options}
        if options:
            kwargs["tokenizer_options"] = options
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        if return_pooled == "unprojected" and self.family == "sdxl":
            raise LunaDaemonError("the unprojected pooled output of SDXL's CLIP-G is not something lunad returns")
        cond, pooled = self._encode(tokens)
        if return_dict:
            return self.add_hooks_to_dict({"cond": cond, "pooled_output": pooled})
        if return_pooled:
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        # ComfyUI encodes unscheduled when no hooks are forced, whatever use_clip_schedule says
        if self.patcher.forced_hooks is not None:
            raise LunaDaemonError("hooks (scheduled CLIP patches) are not supported by the Luna proxy CLIP")
        out = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True,
                                      return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict)
        return [[cond, out]]

    def encode(self, text):
        return self.encode_from_tokens(self.tokenize(text))

    def load_model(self, tokens={}):
        return self.patcher

    def get_key_patches(self):
        return self.patcher.get_key_patches()

    def is_dynamic(self):
        return False

    def add_hooks_to_dict(self, pooled_dict):
        if self.apply_hooks_to_conds:
            pooled_dict["hooks"] = self.apply_hooks_to_conds
        return pooled_dict

    def get_sd(self):
        raise LunaDaemonError("the Luna proxy CLIP holds no weights (they are in lunad): it cannot be saved or merged")

    def state_dict_for_saving(self):
        return self.get_sd()

    def load_sd(self, sd, full_model=False):
        raise LunaDaemonError("the Luna proxy CLIP cannot load weights into lunad's shared model")

    # ---- the daemon ---------------------------------------------------------------

    def _encode(self, tokens):
        torch = _torch()
        lc = lunaclient()
        wire = wire_tokens(tokens, self.family)
        layer = int(self.layer_idx) if self.layer_idx is not None else None
        stack = list(self.stack)

        def run(c):
            if not stack:
                return c.encode(self.model, tokens=wire, clip_layer=layer)
            if hasattr(lc, "LoraImage"):
                loras = [lc.LoraImage(e.data, e.strength, identity=e.identity) for e in stack]
                return c.encode(self.model, tokens=wire, clip_layer=layer, loras=loras)
            return _encode_uploading(c, self.model, wire, layer, stack)

        cond, pooled, info = self.conn.run("encode with %s" % (self.model,), run)
        self.last_info = info
        return torch.from_numpy(np.array(cond, dtype=np.float32)), torch.from_numpy(np.array(pooled, dtype=np.float32))


def _encode_uploading(c, model, wire, layer, stack):
    """Client.encode with in-memory LoRA images for a lunaclient without LoraImage:
    identities in the request, an upload of each image lunad says it lacks, again."""
    lc = lunaclient()
    proto = lc.client.proto
    msg = c.encode_request(model, tokens=wire, clip_layer=layer)
    msg["loras"] = [{"id": e.identity, "strength": e.strength} for e in stack]
    by_id = {e.identity: e for e in stack}
    for attempt in range(4):
        try:
            reply, tensors = c.call(proto.MSG_ENCODE, msg)
            return lc.client.split_encode_reply(reply, tensors, c.peer)
        except lc.LunaError as e:
            if e.code != proto.ENOLORA or not e.missing or attempt == 3:
                raise
            for m in dict.fromkeys(x.lower() for x in e.missing):
                entry = by_id.get(m)
                if entry is None:
                    raise
                c.call(proto.MSG_LORA, {"action": "upload", "id": m}, raw=entry.data)


