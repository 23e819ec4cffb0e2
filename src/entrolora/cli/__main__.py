"""``python -m entrolora.cli`` (what torchrun and accelerate launch)."""

from . import main

main()
