"""Training and fine-tuning: recipes, the loop, callbacks."""

from prunelab.training.loop import Regularizer
from prunelab.training.recipe import PRESETS, TrainRecipe, parameter_groups, preset
from prunelab.training.trainer import Callback, TrainResult, TrainState, train

__all__ = ["PRESETS", "Callback", "Regularizer", "TrainRecipe", "TrainResult", "TrainState",
           "parameter_groups", "preset", "train"]
