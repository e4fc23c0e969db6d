"""Set-up of every Ray worker process of the Ray engine: imports torch before anything of ours.

Our modules register lazily loaded modules (`alip_hf.lazy`), and importing torch walks `sys.modules` through
`inspect`, which would load one of them half-way through torch's own import (a circular import). Importing torch
first, in a module that registers none, avoids that.
"""

import torch  # noqa: F401


def setup() -> None:
    """Ray's `worker_process_setup_hook`: everything is done by importing this module."""
