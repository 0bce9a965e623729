"""The trainer's pieces: options, data, the loss of a step, optimizers, the run's events, saves and state."""
