"""The public API is typed: mypy passes on the package and on the examples of
README.md and the guide (tools/typecheck.py), and every public function and
method carries annotations a user's checker can read."""
import importlib.util
import inspect
import os
import pathlib
import subprocess
import sys

import pytest

import attnkit
import attnkit.functional
import attnkit.io
import attnkit.models
import attnkit.nn
import attnkit.nn.loss
import attnkit.optim
import attnkit.plot
import attnkit.progress
import attnkit.reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
HAVE_MYPY = importlib.util.find_spec("mypy") is not None


def test_the_package_ships_its_types():
    package = pathlib.Path(attnkit.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_kernels.pyi").is_file()


@pytest.mark.skipif(not HAVE_MYPY and os.environ.get("ATTNKIT_REQUIRE_TORCH") != "1",
                    reason="needs mypy (pip install mypy)")
def test_mypy_passes_on_the_package_and_the_pages_examples(tmp_path):
    """About 20 s with an empty mypy cache (most of it reading NumPy's stubs)."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "typecheck.py"),
                             "--cache-dir", str(tmp_path / "mypy-cache")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the package: ok" in result.stdout and "pages: ok" in result.stdout


def test_the_examples_are_extracted_in_order_without_output():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import typecheck
    finally:
        sys.path.remove(str(ROOT / "tools"))
    page = ("text\n\n```python\n>>> x = 1\n>>> for i in range(2):\n...     x += i\n>>> x\n2\n```\n\n"
            "```python\ny = x + 1\n```\n")
    code, origin = typecheck.page_examples(page, fenced=True)
    assert code == ["x = 1", "for i in range(2):", "    x += i", "x", "y = x + 1"]
    assert origin == [4, 5, 6, 7, 12]
    assert typecheck.page_examples(page, fenced=False)[0] == code[:4]


PUBLIC_MODULES = [attnkit, attnkit.functional, attnkit.nn, attnkit.nn.loss, attnkit.optim,
                  attnkit.models, attnkit.io, attnkit.plot, attnkit.progress, attnkit.reference]


def _public_callables():
    seen = set()
    for module in PUBLIC_MODULES:
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member):
                        yield f"{module.__name__}.{name}.{attr}", member
            elif callable(obj):
                yield f"{module.__name__}.{name}", obj


def test_every_public_function_and_method_is_annotated():
    missing = []
    for qualname, func in _public_callables():
        annotations = func.__annotations__
        parameters = [p for p in inspect.signature(func).parameters.values()
                      if p.name not in ("self", "cls")]
        if "return" not in annotations or any(p.name not in annotations for p in parameters):
            missing.append(qualname)
    assert not missing, f"not fully annotated: {missing}"
