import os

# DeepSpeed picks its accelerator at import; CI and this machine have no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
