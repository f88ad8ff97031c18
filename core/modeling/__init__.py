"""SAM building blocks: image encoders (ViT, TinyViT), prompt encoder, two-way transformer, mask decoder."""

from samadapt.modeling.common import MLP, LayerNorm2d, MLPBlock, fused_kernels, set_fused_kernels
from samadapt.modeling.image_encoder_vit import ImageEncoderViT
from samadapt.modeling.mask_decoder import MaskDecoder
from samadapt.modeling.prompt_encoder import PromptEncoder
from samadapt.modeling.sam import EncoderOutput, PromptBatch, PromptGenerator, SamModel
from samadapt.modeling.tiny_vit import TinyViT
from samadapt.modeling.transformer import TwoWayTransformer

__all__ = [
    "MLP",
    "EncoderOutput",
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PromptBatch",
    "PromptEncoder",
    "PromptGenerator",
    "SamModel",
    "TinyViT",
    "TwoWayTransformer",
    "fused_kernels",
    "set_fused_kernels",
]
