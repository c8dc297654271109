"""Fast kernels of the FRUGAL step (batched over same-shape tensors); each has a slow oracle."""
