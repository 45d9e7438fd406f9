"""Layer 3: building models (open_clip names and clip_med's configs), losses, reading checkpoints, export."""

from clip_med.modeling.factory import ModelBundle, ModelConfig, count_parameters, create_model, model_config

__all__ = ["ModelBundle", "ModelConfig", "count_parameters", "create_model", "model_config"]
