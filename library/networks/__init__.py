"""Networks beside the model's frozen layers: kohya's LoRA (names, adapters, files)."""
