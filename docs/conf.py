"""Sphinx configuration for jadam's documentation (`make docs`; offline: nothing is fetched at build time)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import jadam  # noqa: E402

project = "jadam"
author = "the jadam authors"
copyright = "the jadam authors"  # noqa: A001
release = version = jadam.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"
default_role = "code"  # `x` in a docstring is code, as in Markdown

# Google-style docstrings, as STYLE.md asks.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autosummary_generate = False
add_module_names = False

# MyST: $...$ and $$...$$ math, heading anchors for links between guides.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# MathJax ships with the theme's page as a script tag; the build itself fetches nothing.
mathjax3_config = {"tex": {"macros": {}}}

# Every cross-reference to a jadam name must resolve (the build runs with -W --keep-going).
# Names from other libraries are not resolved (no intersphinx: no network at build time).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(optax|jax|jaxlib|numpy|np|jnp|chex|flax|nnx|torch|keras|orbax|ocp|bitsandbytes|typing|collections)(\..*)?"),
  (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|ArrayLike|Array|PyTree|Updates|Params|Mask|Dtype|Config)"),
  (r"py:.*", r"(int|float|bool|str|bytes|tuple|list|dict|object|None|type|callable|optional|os\.PathLike|pathlib\..*)"),
  (r"py:.*", r"(ValueError|TypeError|RuntimeError|KeyError|FileNotFoundError|FileExistsError)"),
]

html_theme = "furo"
html_title = f"jadam {release}"
html_static_path = []
