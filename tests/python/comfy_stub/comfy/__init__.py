"""comfy (test stand-in) -- the few ComfyUI modules luna's nodes meet; see ../README.md."""
