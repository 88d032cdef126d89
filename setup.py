"""Build hook only: every piece of metadata lives in pyproject.toml.

The built-in run, DeepSpeed and study configs live in the repository's top-level `configs/` folder (one
copy, where users and docs look for them); the build copies that folder into the package as
`rct_dist/configs`, so an installed wheel finds them with importlib.resources. A source checkout (and an
editable install of it) reads `configs/` directly (rct_dist.config.builtin_folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"
PATTERNS = ("*.yaml", "*.json", "*.md")


class build_py_with_configs(build_py):
    """build_py, then `configs/` (YAML, JSON and README files) copied into the built `rct_dist/configs`."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads configs/ in place
            return
        if not CONFIGS.is_dir():
            raise FileNotFoundError(f"{CONFIGS} is missing: the built-in configs cannot be packaged")
        target = Path(self.build_lib) / "rct_dist" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        for source in sorted(CONFIGS.rglob("*")):
            if source.is_file() and any(source.match(p) for p in PATTERNS):
                destination = target / source.relative_to(CONFIGS)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination)


setup(cmdclass={"build_py": build_py_with_configs})
