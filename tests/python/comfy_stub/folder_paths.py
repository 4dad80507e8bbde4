"""folder_paths.py (test stand-in) -- ComfyUI's model-folder registry, configurable by tests.

Follows ComfyUI's folder_paths interface (autumn 2025): models_dir, get_folder_paths(kind),
get_filename_list(kind), get_full_path(kind, name), get_full_path_or_raise(kind, name).
Tests call setup(root) to lay out root/models/{checkpoints,text_encoders,clip,vae,embeddings}.
"""

import os

models_dir = None
folder_names_and_paths = {}


def setup(models_root):
    """Point every kind at a folder under 'models_root' (created); returns the mapping."""
    global models_dir
    models_dir = str(models_root)
    folder_names_and_paths.clear()
    for kind in ("checkpoints", "text_encoders", "clip", "vae", "embeddings", "loras"):
        os.makedirs(os.path.join(models_dir, kind), exist_ok=True)
    for kind in ("checkpoints", "vae", "embeddings", "loras"):
        folder_names_and_paths[kind] = [os.path.join(models_dir, kind)]
    # as in ComfyUI, text_encoders also lists the legacy clip folder
    folder_names_and_paths["text_encoders"] = [os.path.join(models_dir, "text_encoders"),
                                               os.path.join(models_dir, "clip")]
    return folder_names_and_paths


def get_folder_paths(kind):
    return list(folder_names_and_paths.get(kind, []))


def get_filename_list(kind):
    out = set()
    for folder in get_folder_paths(kind):
        for base, _, names in os.walk(folder):
            for n in names:
                out.add(os.path.relpath(os.path.join(base, n), folder).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(kind, name):
    for folder in get_folder_paths(kind):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def get_full_path_or_raise(kind, name):
    p = get_full_path(kind, name)
    if p is None:
        raise FileNotFoundError("Model in folder '%s' with filename '%s' not found." % (kind, name))
    return p
