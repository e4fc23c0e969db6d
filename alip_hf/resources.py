"""Files shipped inside the package (package data), found the same way in a checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_DATA = PACKAGE_DIR / "demo_data"  # 3294 public-domain clip-art images with titles (docs/demo_data.md)
CONFIGS_DIR = PACKAGE_DIR / "configs"  # one YAML per published run, and accelerate launch configs
MODEL_CARD_TEMPLATE = PACKAGE_DIR / "model_card.md"  # the repository's model_card.md
EVALUATE_MODULES = PACKAGE_DIR / "evaluate_modules"  # `evaluate.load(str(EVALUATE_MODULES / "retrieval_recall"))`


def run_config(name_or_path: str) -> Path:
    """A run YAML given by path, or by the name of a packaged config (`alip-vit-b-32`, `demo.yaml`, ...).

    Raises:
        FileNotFoundError: neither a file nor a packaged config; the message lists the packaged ones.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIGS_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r}: no such file, and not a packaged config (one of {names})")
