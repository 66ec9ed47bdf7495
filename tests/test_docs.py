"""The examples in README.md and in the package's docstrings run as written."""
import doctest
import pathlib

import pytest

import attnkit
import attnkit.nn.loss
import attnkit.optim
import attnkit.plot

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples():
    result = doctest.testfile(str(README), module_relative=False,
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", [attnkit, attnkit.nn, attnkit.nn.loss, attnkit.optim,
                                    attnkit.plot],
                         ids=lambda m: m.__name__)
def test_package_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
