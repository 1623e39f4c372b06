"""The modules behind the built-in recipes ``models.resnet()``, ``models.mobilenet()``,
``models.transformer()`` and ``models.cnn1d()``, written with torch alone.

Each class takes the data's ``input_shape`` and ``num_classes`` first and adapts to them (where
to downsample, the patch size); :mod:`kdcompress.models` wraps them as
:class:`~kdcompress.models.ModelSpec` recipes that the pipeline builds once it knows the data.
Every submodule keeps only plain attributes (numbers, strings, tuples), so the models save and
load through :mod:`kdcompress.artifacts` without pickled code.
"""

from kdcompress.recipes.cnn1d import CNN1d
from kdcompress.recipes.mobilenet import InvertedResidual, MobileNetV2
from kdcompress.recipes.resnet import BasicBlock, ResNet
from kdcompress.recipes.vit import MLPBlock, PatchEmbedding, SelfAttention, ViT, ViTBlock

__all__ = ["ResNet", "BasicBlock", "MobileNetV2", "InvertedResidual", "ViT", "ViTBlock",
           "SelfAttention", "MLPBlock", "PatchEmbedding", "CNN1d"]
