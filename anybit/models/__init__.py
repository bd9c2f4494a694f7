"""Model definitions; ``registry.get_model_class`` picks one from config.json's architectures."""
