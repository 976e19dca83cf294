"""Model-family knowledge: attention modules, head geometry and layer stacks (see attention.py)."""

from fedprune.structure.attention import (
    SUPPORTED_FAMILIES,
    AttentionModule,
    ModelStructure,
    Projection,
    StructureError,
    UnsupportedModelError,
    describe,
    features,
    projection_names,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "AttentionModule",
    "ModelStructure",
    "Projection",
    "StructureError",
    "UnsupportedModelError",
    "describe",
    "features",
    "projection_names",
]
