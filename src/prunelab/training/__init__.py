"""Training and fine-tuning: recipes, the loop, callbacks."""

from prunelab.training.recipe import PRESETS, TrainRecipe, preset
from prunelab.training.trainer import Callback, TrainResult, TrainState, train

__all__ = ["PRESETS", "Callback", "TrainRecipe", "TrainResult", "TrainState", "preset", "train"]
