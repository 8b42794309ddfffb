"""The models: intensity logistic regression; tile bags, sampling, encoders, attention MIL and
checkpoints for the CNNs."""
