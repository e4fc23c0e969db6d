"""Checkpoint conversion, in and out of the ALIP / transformers CLIP format.

    from_open_clip   open_clip CLIP or official ALIP checkpoint -> ALIPModel      (`from_open_clip.convert_open_clip`)
    to_clip          ALIPModel -> plain transformers CLIPModel directory          (`to_clip.export_to_clip`)
    to_open_clip     ALIP / CLIP model -> open_clip_config.json + weights          (`to_open_clip.export_to_open_clip`)
    from_veclip      released VeCLIP checkpoint -> self-contained model directory (`from_veclip.convert_veclip`)

The command line is `python -m alip_hf.convert CONVERTER [flags]` (`cli`). `modeling_alip`, the folder that ships
to the Hub as remote code, imports none of this. Importing this package is cheap: the converters load torch when
their module is imported, so `--help` answers at once.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it, imported on first use
_EXPORTS = {
    "convert_open_clip": "from_open_clip",
    "export_to_clip": "to_clip",
    "export_to_open_clip": "to_open_clip",
    "convert_veclip": "from_veclip",
    "CONVERTERS": "cli",
    "build_parser": "cli",
    "cli": "cli",
    "main": "cli",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
