"""comfy.sdxl_clip (test stand-in): SDXLClipGTokenizer and SDXLTokenizer with ComfyUI's interface.

Follows ComfyUI's comfy/sdxl_clip.py of 2025 (the newest the index held for this file
was an older form, see the report; the interface below is the tokenizer_data / **kwargs
one that CLIP.tokenize needs): SDXLClipGTokenizer(tokenizer_path=None,
embedding_directory=None, tokenizer_data={}) is an SDTokenizer with pad_with_end=False
(pads with 0), embedding_size=1280, embedding_key='clip_g'; SDXLTokenizer(
embedding_directory=None, tokenizer_data={}) holds clip_l (tokenizer_data's
"clip_l_tokenizer_class", else SDTokenizer) and clip_g, and tokenize_with_weights(text,
return_word_ids=False, **kwargs) returns {"g": ..., "l": ...}; state_dict() is {}.
Written for luna from those facts; nothing is copied.
"""

from . import sd1_clip


class SDXLClipGTokenizer(sd1_clip.SDTokenizer):
    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data={}):
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=1280, embedding_key="clip_g", tokenizer_data=tokenizer_data)


class SDXLTokenizer:
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        clip_l_class = tokenizer_data.get("clip_l_tokenizer_class", sd1_clip.SDTokenizer)
        self.clip_l = clip_l_class(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.clip_g = SDXLClipGTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"g": self.clip_g.tokenize_with_weights(text, return_word_ids, **kwargs),
                "l": self.clip_l.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def state_dict(self):
        return {}
