"""Sphinx configuration of the schce documentation (builds offline)."""

import filecmp
import os
import shutil
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

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

# Tutorials live in ../tutorials, where users open them as notebooks (jupytext MyST); Sphinx reads only its source
# folder, so they are mirrored into docs/notebooks (git-ignored) on every build. Unchanged files are not touched,
# which keeps incremental builds incremental; files deleted upstream are deleted here.
_TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
_NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"


def _mirror_tutorials() -> None:
    _NOTEBOOKS.mkdir(exist_ok=True)
    sources = {p.name: p for p in _TUTORIALS.glob("*") if p.suffix in {".md", ".ipynb"} and p.name != "README.md"}
    for stale in _NOTEBOOKS.iterdir():
        if stale.name not in sources:
            stale.unlink()
    for name, src in sources.items():
        dst = _NOTEBOOKS / name
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            shutil.copy2(src, dst)


_mirror_tutorials()

# MyST / notebooks
myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath", "html_image"]
myst_heading_anchors = 3
# Every build runs every tutorial, so rendered outputs come from the current code; an error fails the build.
nb_execution_mode = "force"
nb_execution_timeout = 300  # seconds per cell; each tutorial takes about a minute in all
# The tutorials' models are tiny: one OpenMP thread per kernel avoids the oversubscription that makes them many
# times slower on a shared CI runner. Kernels inherit this environment; a value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
nb_execution_raise_on_error = True
nb_execution_show_tb = True  # the traceback goes to the build log
nb_execution_in_temp = True  # files the tutorials write go to a temporary folder, not into docs/
nb_merge_streams = True
nb_output_stderr = "show"  # the warnings and INFO lines a user will see, as they will see them

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
