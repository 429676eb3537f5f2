"""Region masks: RLE storage format, mask sources and automatic proposals.

Everything here deals in full-image boolean masks (H, W); :mod:`regionsearch.masks.rle` turns
them into COCO RLE for storage.
"""

from regionsearch.masks.proposals import AutomaticProposals
from regionsearch.masks.rle import (
    RLE,
    area,
    bbox,
    decode,
    decode_many,
    encode,
    encode_many,
    from_polygons,
    iou_matrix,
)
from regionsearch.masks.sam import Sam2Proposals, SamProposals
from regionsearch.masks.sources import (
    SOURCE_KINDS,
    CocoAnnotationSource,
    MaskSource,
    PngMaskSource,
    RegionProposal,
    as_rgb,
)

__all__ = [
    "RLE",
    "SOURCE_KINDS",
    "AutomaticProposals",
    "CocoAnnotationSource",
    "MaskSource",
    "PngMaskSource",
    "RegionProposal",
    "Sam2Proposals",
    "SamProposals",
    "area",
    "as_rgb",
    "bbox",
    "decode",
    "decode_many",
    "encode",
    "encode_many",
    "from_polygons",
    "iou_matrix",
]
