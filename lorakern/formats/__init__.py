"""Weight formats: canonical packing, the quantized-weight container, safetensors I/O."""
from .io import FormatError, load_quantized, read_safetensors, save_quantized
from .outliers import MAX_OUTLIER_K, GWQWeight, SparseOutliers
from .packing import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, pack_codes, packed_row_bytes, unpack_codes
from .quantized import FORMAT_VERSION, QuantizedWeight

__all__ = [
    "FORMAT_VERSION", "FormatError", "GWQWeight", "MAX_OUTLIER_K", "QuantizedWeight", "SparseOutliers", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES",
    "load_quantized", "pack_codes", "packed_row_bytes", "read_safetensors", "save_quantized", "unpack_codes",
]
