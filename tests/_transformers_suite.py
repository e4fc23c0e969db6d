"""transformers' own test mixins (`ModelTesterMixin`, `ProcessorTesterMixin`, `ConfigTester`), loaded from the
source distribution of the installed transformers version.

The installed wheel holds no tests; the sdist on the package index holds `tests/test_modeling_common.py`,
`tests/test_processing_common.py` and `tests/test_configuration_common.py` (not the per-model test files, nor the
helper modules those three import). `transformers_suite()` finds them, in this order:
1. `$ALIP_TRANSFORMERS_TESTS`: a directory holding the sdist's `tests/` files;
2. the cache `.cache/transformers-tests/<version>/` of the checkout (ignored by git);
3. `pip download --no-deps --no-binary :all: transformers==<version>` from the configured index, whose `tests/`
   is unpacked into that cache (written to a temporary folder, then renamed: concurrent runs never see half);
and skips the calling module, with the reason, only when the index cannot be reached.

The three modules import helpers that the sdist does not ship; they are replaced by stand-ins, each named here:
- `tests/exporters/test_export.py:ExportTesterMixin` -> an empty mixin (the `torch.export` tests are not run);
- `tests/generation/test_utils.py:GenerationTesterMixin` -> an empty mixin (CLIP does not generate);
- `tests/utils/test_configuration_utils.py:config_common_kwargs` -> `{}` (only read for configs without
  sub-configs; CLIP's and ALIP's have two);
- `utils/fetch_hub_objects_for_ci.py:url_to_local_path` -> the URL itself (tests that read images from the Hub
  fail alike for every processor: no network in tests).
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

CACHE_ROOT = Path(__file__).resolve().parents[1] / ".cache" / "transformers-tests"
PACKAGE = "transformers_suite"  # the sdist's tests/ folder is imported as this package (it uses relative imports)
REQUIRED = ("__init__.py", "test_modeling_common.py", "test_processing_common.py", "test_configuration_common.py")


def _download(version: str, destination: Path) -> None:
    """Unpacks the sdist's `tests/*.py` into `destination` (created by renaming a finished temporary folder)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", f"transformers=={version}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            import pytest  # imported here: .ci/run fetches the suite before the test extras are installed

            pytest.skip(f"transformers' test mixins: `{' '.join(command[1:])}` failed, the package index cannot be "
                        f"reached ({result.stderr.strip().splitlines()[-1:]}); set ALIP_TRANSFORMERS_TESTS to an "
                        "unpacked copy of the sdist's tests/", allow_module_level=True)
        unpacked = Path(tmp) / "tests"
        unpacked.mkdir()
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = member.name
                # Only the top-level test modules: the mixins, nothing to execute at unpack time.
                if member.isfile() and name.startswith(prefix) and "/" not in name[len(prefix):]:
                    member.name = name[len(prefix):]
                    archive.extract(member, unpacked, filter="data")
        # The repository's tests/__init__.py is empty and the sdist leaves it out; test_configuration_common reads it.
        (unpacked / "__init__.py").touch()
        try:
            unpacked.rename(destination)
        except OSError:  # another process finished first; its copy is the same
            if not destination.is_dir():
                raise


def suite_dir() -> Path:
    """The directory of transformers' common test modules for the installed version (fetched if needed)."""
    configured = os.environ.get("ALIP_TRANSFORMERS_TESTS")
    if configured:
        directory = Path(configured)
    else:
        directory = CACHE_ROOT / transformers.__version__
        if not directory.is_dir():
            _download(transformers.__version__, directory)
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not transformers' tests/ folder: missing {missing}")
    return directory


def _stub(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules.setdefault(name, module)


def transformers_suite(module: str) -> types.ModuleType:
    """Imports `tests/<module>.py` of transformers' sdist (e.g. `"test_modeling_common"`) with the stand-ins above."""
    if PACKAGE not in sys.modules:
        directory = suite_dir()
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(directory)]
        sys.modules[PACKAGE] = package
        for sub in ("exporters", "generation", "utils"):
            _stub(f"{PACKAGE}.{sub}", __path__=[])
        _stub(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _stub(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _stub(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
        _stub("fetch_hub_objects_for_ci", url_to_local_path=lambda url, *args, **kwargs: url)
    return importlib.import_module(f"{PACKAGE}.{module}")
