"""Classic models built from ``dlkernels.nn``: the image models with torchvision's parameter names (their
``state_dict``s load into torchvision's models and back), LSTM sequence models and a speech Transformer encoder.

Every builder takes ``stock=True`` to build the same architecture from ``torch.nn`` alone (same parameter names,
same initialization for the same seed): the baseline for benchmarks and tests.
"""
from .image import lenet5, resnet18, resnet34, vgg11, vgg16
from .sequence import bilstm_tagger, lstm_lm, speech_encoder

__all__ = ["lenet5", "vgg11", "vgg16", "resnet18", "resnet34", "bilstm_tagger", "lstm_lm", "speech_encoder"]
