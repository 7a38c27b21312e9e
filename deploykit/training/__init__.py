"""Training on synthetic data: where deploykit needs a model with learned weights."""
