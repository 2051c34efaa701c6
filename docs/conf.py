"""Sphinx configuration of the schce documentation (builds offline)."""

from datetime import datetime
from importlib.metadata import metadata

info = metadata("schce")
project = info["Name"]
author = "schce developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
try:  # optional: type hints rendered into the parameter lists
    import sphinx_autodoc_typehints  # noqa: F401
except ImportError:
    pass
else:
    extensions.append("sphinx_autodoc_typehints")

# No intersphinx: the docs must build without network access.
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"

# MyST / notebooks
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials will be executed during the build once they exist

# API
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True}
autodoc_typehints = "description"
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = False  # free-text "Returns" sections read as descriptions
napoleon_use_param = True
always_use_bars_union = True
typehints_defaults = "comma"

# HTML
html_theme = "sphinx_book_theme"
html_title = "schce"
html_static_path = ["_static"]
html_theme_options = {
    "repository_url": "https://github.com/schce/schce",
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
