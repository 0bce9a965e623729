"""Tools beside the trainer and generator: the shapes world, its model builder, the demo and the concept evaluation."""

import library  # noqa: F401  (first: it quiets bitsandbytes' offline notice before diffusers imports it)
