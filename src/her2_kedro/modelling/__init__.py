"""The models: intensity logistic regression; tile bags, sampling, encoders, attention MIL, the
whole-core ResNet classifier (downscaled core batches) and checkpoints for the CNNs."""
