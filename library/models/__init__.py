"""Stable Diffusion models: reading every family and layout offline, writing test and demo checkpoints."""
