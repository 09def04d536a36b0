"""Sphinx configuration: MyST Markdown pages, API pages from the docstrings (autodoc + napoleon).

Sphinx + MyST as optax and flax build theirs: the guides are Markdown (the
same files GitHub renders, and that tests/test_docs.py executes block by
block), and the API reference is generated from the Google-style docstrings
by autodoc, with no second copy of any signature. Build: `make docs`
(warnings are errors).
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, not another install

import optaxclip  # noqa: E402

project = "optaxclip"
author = "optaxclip developers"
copyright = "2026, optaxclip developers"
release = version = optaxclip.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Edge cases", "notes_style"), ("References", "notes_style")]

html_theme = "sphinx_book_theme"
html_title = f"optaxclip {release}"
html_theme_options = {"show_toc_level": 2}

# The docstrings write code as Markdown does, in single backticks: render it as code.
default_role = "code"


def _markdown_backticks(app, what, name, obj, options, lines):
    """`Finding`s, `psum`med: reST needs an escaped space between a backtick and a letter."""
    import re

    for i, line in enumerate(lines):
        lines[i] = re.sub(r"(?<=\w)`(?=[A-Za-z])", r"`\\ ", line)


def setup(app):
    app.connect("autodoc-process-docstring", _markdown_backticks)
