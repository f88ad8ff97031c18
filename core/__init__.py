"""samadapt: Segment Anything adapted to medical imaging and remote sensing.

The core holds the SAM model (own implementation, official checkpoint names), the builders, the
checkpoint loader, the predictor and the CLI. It imports neither ``samadapt.adapters`` nor
``samadapt.domains``.
"""

if __name__ != "samadapt":
    raise ImportError("import samadapt (after `pip install -e .`), not the repo folder `core`")

from samadapt.builders import VARIANTS, Variant, build, register_variant, variants
from samadapt.checkpoint import load_model, save_model
from samadapt.errors import CheckpointError, InputError, SamadaptError, UnknownVariantError
from samadapt.modeling import SamModel
from samadapt.predictor import ImageEmbedding, Prediction, Predictor
from samadapt.preprocess import PROFILES, PreprocessProfile
from samadapt.weights import resolve_checkpoint

__version__ = "0.1.0"

__all__ = [
    "PROFILES",
    "VARIANTS",
    "CheckpointError",
    "ImageEmbedding",
    "InputError",
    "Prediction",
    "Predictor",
    "PreprocessProfile",
    "SamModel",
    "SamadaptError",
    "UnknownVariantError",
    "Variant",
    "__version__",
    "build",
    "load_model",
    "register_variant",
    "resolve_checkpoint",
    "save_model",
    "variants",
]
