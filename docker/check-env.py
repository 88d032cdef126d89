"""Build-time check of the image's Python environment: the pinned torch is the one installed, and the
package and its main dependencies import. Prints the versions for the build log."""
from importlib import metadata

import deepspeed
import timm
import torch
import torchvision

import rct_dist  # noqa: F401

print("torch", torch.__version__, "cuda", torch.version.cuda, "| torchvision", torchvision.__version__,
      "| deepspeed", deepspeed.__version__, "| timm", timm.__version__, "| rct-dist", metadata.version("rct-dist"))
with open("/opt/venv/constraints.txt") as f:
    pins = dict(line.strip().split("==", 1) for line in f if "==" in line)
for name, pinned in pins.items():
    installed = metadata.version(name)
    assert installed == pinned, f"{name} {installed} installed, {pinned} pinned"
