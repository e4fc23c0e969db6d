"""`python -m alip_hf.convert CONVERTER [flags]`."""

from alip_hf.convert.cli import cli

cli()
