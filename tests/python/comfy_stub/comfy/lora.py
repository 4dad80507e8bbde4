"""comfy.lora (test stand-in): load_lora and model_lora_keys_clip as ComfyUI defines them.

Followed: Comfy-Org/ComfyUI comfy/lora.py at commit 17358c8f73b581a0d22facc3c385822f09b8bfb1
(same load_lora as comfyanonymous/ComfyUI of mid/late 2025). Written for luna from what
that file does; nothing is copied.

model_lora_keys_clip(model, key_map={}), from model.state_dict().keys():
  * every "<k>.weight" -> "text_encoders.<k>"; for a key holding ".transformer." past its
    first character that does not start with "clip_", also "text_encoders.<k from after
    the wrapper prefix>"; the set of first components is remembered;
  * for b in 0..31 and each LORA_CLIP_MAP module m (kohya name n), in this order:
      clip_h.transformer.text_model.encoder.layers.b.m.weight <- lora_te_..._b_n,
          lora_te1_..._b_n, text_encoder.text_model.encoder.layers.b.m
      clip_l.... <- the same three (clip_l is then "present")
      clip_g.... (clip_g "present") <- with clip_l present: lora_te2_..._b_n and
          text_encoder_2.text_model.encoder.layers.b.m; else lora_te_..._b_n,
          text_encoder.text_model.encoder.layers.b.m and lora_prior_te_..._b_n
    (lora_te*_... is "lora_te*_text_model_encoder_layers_{b}_{n}");
  * t5xxl.transformer.* -> lora_te{i}_<path with _> (i from which CLIPs are present),
    hydit_clip.transformer.bert.* -> lora_te1_<path with _>;
  * a single first component P: "P.transformer.model.<k>.weight" -> lora_te_<k with _>;
  * clip_g.transformer.text_projection.weight <- lora_prior_te_text_projection and
    lora_te2_text_projection; clip_l.transformer.text_projection.weight <-
    lora_te1_text_projection.
load_lora(lora, to_load, log_missing=True): for each prefix x of to_load: alpha
  (x.alpha, .item()), dora_scale (x.dora_scale); then every adapter class of
  weight_adapter.adapters is tried in order and each one that loads replaces the entry
  (ComfyUI's loop does not stop at the first); then, independently, x.w_norm (+ x.b_norm
  on the bias), x.diff, x.diff_b (bias), x.set_weight, each overwriting the entry:
  ("diff", (t,)) / ("set", (t,)). Unconsumed file keys: "lora key not loaded: <k>".
"""

import logging

from . import weight_adapter

LORA_CLIP_MAP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}

_KOHYA = "lora_te%s_text_model_encoder_layers_%d_%s"


def _bias_of(target):
    return target[:-len(".weight")] + ".bias"


def load_lora(lora, to_load, log_missing=True):
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        target = to_load[x]
        alpha = None
        if x + ".alpha" in lora:
            alpha = lora[x + ".alpha"].item()
            loaded_keys.add(x + ".alpha")
        dora_scale = None
        if x + ".dora_scale" in lora:
            dora_scale = lora[x + ".dora_scale"]
            loaded_keys.add(x + ".dora_scale")

        for cls in weight_adapter.adapters:
            adapter = cls.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[target] = adapter
                loaded_keys.update(adapter.loaded_keys)

        w_norm, b_norm = lora.get(x + ".w_norm"), lora.get(x + ".b_norm")
        if w_norm is not None:
            loaded_keys.add(x + ".w_norm")
            patch_dict[target] = ("diff", (w_norm,))
            if b_norm is not None:
                loaded_keys.add(x + ".b_norm")
                patch_dict[_bias_of(target)] = ("diff", (b_norm,))
        if lora.get(x + ".diff") is not None:
            patch_dict[target] = ("diff", (lora[x + ".diff"],))
            loaded_keys.add(x + ".diff")
        if lora.get(x + ".diff_b") is not None:
            patch_dict[_bias_of(target)] = ("diff", (lora[x + ".diff_b"],))
            loaded_keys.add(x + ".diff_b")
        if lora.get(x + ".set_weight") is not None:
            patch_dict[target] = ("set", (lora[x + ".set_weight"],))
            loaded_keys.add(x + ".set_weight")

    if log_missing:
        for k in lora:
            if k not in loaded_keys:
                logging.warning("lora key not loaded: %s", k)
    return patch_dict


def model_lora_keys_clip(model, key_map={}):
    sdk = model.state_dict().keys()
    prefixes = set()
    for k in sdk:
        if k.endswith(".weight"):
            key_map["text_encoders." + k[:-len(".weight")]] = k
            tp = k.find(".transformer.")
            if tp > 0 and not k.startswith("clip_"):
                key_map["text_encoders." + k[tp + 1:-len(".weight")]] = k
            prefixes.add(k.split(".")[0])

    clip_l_present = clip_g_present = False
    for b in range(32):
        for mod, n in LORA_CLIP_MAP.items():
            k = "clip_h.transformer.text_model.encoder.layers.%d.%s.weight" % (b, mod)
            if k in sdk:
                key_map[_KOHYA % ("", b, n)] = k
                key_map[_KOHYA % ("1", b, n)] = k
                key_map["text_encoder.text_model.encoder.layers.%d.%s" % (b, mod)] = k
            k = "clip_l.transformer.text_model.encoder.layers.%d.%s.weight" % (b, mod)
            if k in sdk:
                key_map[_KOHYA % ("", b, n)] = k
                key_map[_KOHYA % ("1", b, n)] = k
                clip_l_present = True
                key_map["text_encoder.text_model.encoder.layers.%d.%s" % (b, mod)] = k
            k = "clip_g.transformer.text_model.encoder.layers.%d.%s.weight" % (b, mod)
            if k in sdk:
                clip_g_present = True
                if clip_l_present:
                    key_map[_KOHYA % ("2", b, n)] = k
                    key_map["text_encoder_2.text_model.encoder.layers.%d.%s" % (b, mod)] = k
                else:
                    key_map[_KOHYA % ("", b, n)] = k
                    key_map["text_encoder.text_model.encoder.layers.%d.%s" % (b, mod)] = k
                    key_map["lora_prior_te_text_model_encoder_layers_%d_%s" % (b, n)] = k

    for k in sdk:
        if not k.endswith(".weight"):
            continue
        if k.startswith("t5xxl.transformer."):
            path = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            index = 1
            if clip_g_present:
                index += 1
            if clip_l_present:
                index += 1
                if index == 2:
                    key_map["lora_te%d_%s" % (index, path)] = k
                    index += 1
            key_map["lora_te%d_%s" % (index, path)] = k
        elif k.startswith("hydit_clip.transformer.bert."):
            path = k[len("hydit_clip.transformer.bert."):-len(".weight")].replace(".", "_")
            key_map["lora_te1_" + path] = k

    if len(prefixes) == 1:
        full = "%s.transformer.model." % next(iter(prefixes))
        for k in sdk:
            if k.endswith(".weight") and k.startswith(full):
                key_map["lora_te_" + k[len(full):-len(".weight")].replace(".", "_")] = k

    k = "clip_g.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_prior_te_text_projection"] = k
        key_map["lora_te2_text_projection"] = k
    k = "clip_l.transformer.text_projection.weight"
    if k in sdk:
        key_map["lora_te1_text_projection"] = k
    return key_map
