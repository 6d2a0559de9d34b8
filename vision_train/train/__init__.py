"""Training: ``state`` (TrainState, optimizer), ``steps`` (pure jitted steps), ``loop`` (the run)."""
