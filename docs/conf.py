"""
Sphinx configuration of udpdst's documentation: the narrative pages in
Markdown (MyST), and the API reference from the docstrings by pydoctor, as
Twisted builds its own.

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from udpdst import __version__  # noqa: E402

project = "udpdst"
author = "the udpdst authors"
copyright = "udpdst authors, MIT licence"
release = version = __version__

extensions = [
    "myst_parser",
    # pydoctor's extension needs it loaded; no inventory is fetched.
    "sphinx.ext.intersphinx",
    "pydoctor.sphinx_ext.build_apidocs",
]
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "examples"]
myst_heading_anchors = 3
# A reference to the API that does not resolve is an error, like any warning.
nitpicky = True
html_static_path = ["_static"]
html_title = f"udpdst {release}"

# The API reference: pydoctor writes it into the HTML output's api/ folder.
pydoctor_args = [
    f"--project-name=udpdst {release}",
    "--project-url=../index.html",
    "--docformat=epytext",
    "--html-output={outdir}/api",
    "--warnings-as-errors",
    "--quiet",
    str(ROOT / "udpdst"),
]
pydoctor_url_path = "api/"
