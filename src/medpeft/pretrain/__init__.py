"""Self-supervised pretraining of foundation models on unlabelled images (masked autoencoders)."""

from medpeft.pretrain.mae import MaskedAutoencoder
from medpeft.pretrain.recipe import MAE_CHECKPOINT, pretrain

__all__ = ["MAE_CHECKPOINT", "MaskedAutoencoder", "pretrain"]
