"""transformers' own common model tests (`tests/test_modeling_common.py` of the installed version), fetched from the
sdist on PyPI into a git-ignored cache (`tests/.cache/`) the first time they are needed.

The sdist ships `tests/*.py` but not `tests/exporters/` nor `tests/generation/`, which `test_modeling_common.py`
imports two mixins from: `ExportTesterMixin` (the torch.export tests) becomes an empty class, so those tests do not
run here; `GenerationTesterMixin` is not part of `ModelTesterMixin` (generation is covered by the project's own tests).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

CACHE = Path(__file__).resolve().parent / ".cache"
PACKAGE = "transformers_common_tests"
STUBS = {
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
}


def fetch_sdist_tests(version: str = transformers.__version__) -> Path:
    """The folder holding the package `transformers_common_tests` (the sdist's `tests/`), downloading it once."""
    root = CACHE / f"transformers-{version}"
    package = root / PACKAGE
    if (package / "test_modeling_common.py").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"transformers-{version}.tar.gz"
    if not archive.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", str(root)],
            check=True, timeout=600,
        )
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".py") and "/" not in member.name[len(prefix):]:
                target = package / member.name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    (package / "__init__.py").write_text("")
    for name, text in STUBS.items():
        (package / name).parent.mkdir(exist_ok=True)
        (package / Path(name).parent / "__init__.py").write_text("")
        (package / name).write_text(text)
    return root


def load_modeling_common():
    """`test_modeling_common` of the installed transformers, as a module."""
    root = fetch_sdist_tests()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
