"""Type-check attnkit and the examples its pages show, with mypy.

    python tools/typecheck.py            (from anywhere; mypy must be installed)

Two runs, against the attnkit that `import attnkit` finds (the installed
package, or the source tree of an editable install), under pyproject.toml's
[tool.mypy] settings:

1. the package itself (mypy -p attnkit), its stub of the C extension included;
2. the examples of README.md and of every docs/**/*.md page: each page's
   doctest code (the `>>>` and `...` lines, in order, output left out) and,
   in README.md, its ```python blocks written without prompts, one temporary
   module per page. Errors are reported at the page's own line numbers.

An interactive session rebinds names freely (`out` is an array, later a
tuple), so the examples are checked with --allow-redefinition; nothing else
is relaxed. Exits 1 if either run finds an error.
"""
from __future__ import annotations

import argparse
import doctest
import importlib.util
import os
import pathlib
import re
import site
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def page_examples(text: str, fenced: bool) -> tuple[list[str], list[int]]:
    """The code of a page as module lines, and the page line (1-based) each came from."""
    chunks: list[tuple[int, str]] = []            # (0-based page line, source)
    for example in doctest.DocTestParser().get_examples(text):
        chunks.append((example.lineno, example.source))
    if fenced:   # ```python blocks with no prompt: plain programs
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start, body = i + 1, []
                i += 1
                while i < len(lines) and lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                if body and not any(line.lstrip().startswith(">>>") for line in body):
                    chunks.append((start, "\n".join(body) + "\n"))
            i += 1
    chunks.sort(key=lambda chunk: chunk[0])
    code: list[str] = []
    origin: list[int] = []
    for lineno, source in chunks:
        for offset, line in enumerate(source.rstrip("\n").split("\n")):
            code.append(line)
            origin.append(lineno + offset + 1)
    return code, origin


def search_path() -> list[str]:
    """MYPYPATH entries that make mypy find the attnkit `import attnkit` finds:
    none when that is in site-packages (mypy looks there itself, and refuses
    it in MYPYPATH); its parent directory otherwise (an editable install, whose
    import hook mypy does not run)."""
    spec = importlib.util.find_spec("attnkit")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("typecheck: attnkit is not installed (pip install -e . or pip install .)")
    parent = pathlib.Path(list(spec.submodule_search_locations)[0]).resolve().parent
    packages = {pathlib.Path(p).resolve() for p in site.getsitepackages() + [site.getusersitepackages()]}
    packages.add(pathlib.Path(sysconfig.get_paths()["purelib"]).resolve())
    packages.add(pathlib.Path(sysconfig.get_paths()["platlib"]).resolve())
    return [] if parent in packages else [str(parent)]


def run_mypy(args: list[str], cache_dir: str, mypy_path: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if mypy_path:
        env["MYPYPATH"] = os.pathsep.join(mypy_path + [p for p in env.get("MYPYPATH", "").split(os.pathsep) if p])
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", cache_dir, "--no-error-summary", "--hide-error-context",
               "--show-error-codes", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="mypy's cache (default: a temporary directory)")
    options = parser.parse_args(argv)
    if importlib.util.find_spec("mypy") is None:
        sys.exit("typecheck: mypy is not installed (pip install mypy)")
    mypy_path = search_path()
    failed = False
    with tempfile.TemporaryDirectory(prefix="attnkit-typecheck-") as tmp:
        cache_dir = options.cache_dir or os.path.join(tmp, "cache")

        # 1. the package
        result = run_mypy(["-p", "attnkit"], cache_dir, mypy_path)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        failed |= result.returncode != 0
        print(f"typecheck: the package: {'FAILED' if result.returncode else 'ok'}")

        # 2. the pages' examples, one module per page
        pages = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
        examples = pathlib.Path(tmp) / "examples"
        examples.mkdir()
        origins: dict[str, tuple[pathlib.Path, list[int]]] = {}
        for page in pages:
            code, origin = page_examples(page.read_text(encoding="utf-8"), fenced=page.name == "README.md")
            if not code:
                continue
            name = "page_" + re.sub(r"\W", "_", str(page.relative_to(ROOT).with_suffix(""))) + ".py"
            (examples / name).write_text("\n".join(code) + "\n", encoding="utf-8")
            origins[name] = (page, origin)
        files = [str(examples / name) for name in origins]
        result = run_mypy(["--allow-redefinition", *files], cache_dir, mypy_path)
        failed |= result.returncode != 0

        def to_page(match: re.Match[str]) -> str:
            page, origin = origins[pathlib.Path(match["file"]).name]
            line = int(match["line"])
            where = origin[line - 1] if 0 < line <= len(origin) else line
            return f"{page.relative_to(ROOT)}:{where}:"

        pattern = re.compile(r"^(?P<file>\S*page_\w+\.py):(?P<line>\d+):", re.M)
        sys.stdout.write(pattern.sub(to_page, result.stdout))
        sys.stderr.write(result.stderr)
        print(f"typecheck: the examples of {len(files)} pages: {'FAILED' if result.returncode else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
