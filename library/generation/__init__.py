"""Image generation shared by the generator and the trainer's samples: pipelines, samplers, prompt files."""
