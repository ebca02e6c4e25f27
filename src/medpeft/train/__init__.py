"""Fine-tuning: the recipe (setup -> epochs -> finish) and the training-only features it uses
(activation recomputation, frozen-prefix caching)."""

from medpeft.train.recipe import train

__all__ = ["train"]
