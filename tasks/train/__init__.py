"""What the training kinds share: the trainer loop and its settings, multi-process launch, health verdicts, Spectrum
layer selection, the LM head at scored tokens."""
