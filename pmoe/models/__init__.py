"""Models: the paper's two-layer networks (SPEC §2) and the CIFAR Wide-ResNets (SPEC §3)."""
from .factory import MODELS, build_model, default_model_args
from .paper import CNNClassifier, PMoEClassifier, fixed_head
from .wrn import BasicBlock, WideResNet, WRNPMoE

__all__ = ["MODELS", "BasicBlock", "CNNClassifier", "PMoEClassifier", "WRNPMoE", "WideResNet", "build_model",
           "default_model_args", "fixed_head"]
