"""The models: the intensity logistic regression now; attention MIL, ResNet34 and CLAM to come."""
