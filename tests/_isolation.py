"""Prelude for subprocess scripts that must run as on a user's machine without this package.

`pip install -e .` (as in CI) makes `modeling_alip` importable from anywhere, so a clean working directory and
PYTHONPATH are not enough: the prelude hides the package from the import system and checks that it is hidden.
"""

HIDE_PACKAGE = '''
import sys

class HidePackage:  # modeling_alip unimportable even where it is pip-installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_alip":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HidePackage())
try:
    import modeling_alip
    raise AssertionError(f"modeling_alip is importable from {modeling_alip.__file__}")
except ModuleNotFoundError:
    pass
'''
