"""Check the layer contract of pyproject.toml ([tool.importlinter]) with import-linter.

``fastlora.kernels`` is the repository's top-level ``kernels/`` folder, mapped into the package by setuptools'
``package-dir``. import-linter (grimp) finds a package's modules by walking its folder, so it would not see the
kernels at all; the check therefore runs on a staged copy of the package laid out as it is installed
(``fastlora/`` with ``kernels/`` as ``fastlora/kernels/``), from which it runs.

Usage: python scripts/lint_imports.py   (exit code 0 when every contract holds)
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fastlora-layers-") as staging:
        package = Path(staging) / "fastlora"
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / "fastlora", package, ignore=ignore)
        shutil.copytree(ROOT / "kernels", package / "kernels", ignore=ignore)
        # import-linter puts the working directory first on sys.path: work from the staged copy.
        os.chdir(staging)
        sys.path.insert(0, staging)
        for name in [m for m in sys.modules if m == "fastlora" or m.startswith("fastlora.")]:
            del sys.modules[name]
        return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)


if __name__ == "__main__":
    sys.exit(main())
