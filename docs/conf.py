"""Sphinx configuration for jadam's documentation (`make docs`; offline: nothing is fetched at build time)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import jax  # noqa: E402
import optax  # noqa: E402
from sphinx.util.typing import stringify_annotation  # noqa: E402

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
  "sphinx-mathjax-offline",  # MathJax 3 copied into the site: the pages render math without a network
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


# Every cross-reference to a jadam name must resolve (the build runs with -W --keep-going).
# Names from other libraries are not resolved (no intersphinx: no network at build time).
nitpicky = True
nitpick_ignore_regex = [
  (
    r"py:.*",
    r"(optax|jax|jaxlib|numpy|np|jnp|chex|flax|nnx|torch|keras|orbax|ocp|bitsandbytes|typing|collections)(\..*)?",
  ),
  (
    r"py:.*",
    r"(Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|ArrayLike|Array|PyTree|Updates|Params|Mask|Dtype|Config)",
  ),
  (
    r"py:.*",
    r"(int|float|bool|str|bytes|tuple|tuple\[.*|list|dict|object|None|type|callable|optional|os\.PathLike|pathlib\..*)",
  ),
  (r"py:.*", r"(ValueError|TypeError|RuntimeError|KeyError|FileNotFoundError|FileExistsError)"),
  # annotations that name a private module's class (jadam._tuning.plateau.PlateauRule): rendered, not linked
  (r"py:class", r"(jadam\._[a-z_.]+|_[a-z_]+)\.[A-Za-z_]+"),
]

html_theme = "furo"
html_title = f"jadam {release}"
html_static_path = []


# Signatures read `optax.ScalarOrSchedule`, not the union it expands to (a float, an array or a schedule).
_ALIASES = {"optax.ScalarOrSchedule": optax.ScalarOrSchedule, "ArrayLike": jax.typing.ArrayLike}


def _shorten_aliases(app, what, name, obj, options, signature, return_annotation):
  del app, what, name, obj, options
  for short, alias in _ALIASES.items():
    for mode in ("smart", "fully-qualified-except-typing"):
      long = stringify_annotation(alias, mode)
      signature = signature.replace(long, short) if signature else signature
      return_annotation = return_annotation.replace(long, short) if return_annotation else return_annotation
  return signature, return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _shorten_aliases)
