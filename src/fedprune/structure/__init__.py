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
from fedprune.structure.importance import ImportanceAccumulator, head_importance

__all__ = [
    "SUPPORTED_FAMILIES",
    "AttentionModule",
    "ImportanceAccumulator",
    "ModelStructure",
    "Projection",
    "StructureError",
    "UnsupportedModelError",
    "describe",
    "features",
    "head_importance",
    "projection_names",
]
