"""raylab: adversarial training with diffusion-generated data on Ray, tracked in MLflow."""
__version__ = "0.1.0"
