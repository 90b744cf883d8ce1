"""Pallas kernels for the compression operators (import name ``fedjax_fm_kernels``).

Each module has the kernel body (``_xxx_kernel``), a jitted wrapper
``xxx(..., interpret=False)`` and a plain ``jnp`` ``xxx_reference``.
"""

from fedjax_fm_kernels.quantize_pack import quantize_pack
from fedjax_fm_kernels.quantize_pack import quantize_pack_reference
from fedjax_fm_kernels.topk_threshold import threshold_count
from fedjax_fm_kernels.topk_threshold import threshold_count_reference
from fedjax_fm_kernels.topk_threshold import threshold_mask
from fedjax_fm_kernels.topk_threshold import threshold_mask_reference
from fedjax_fm_kernels.topk_threshold import topk_threshold
from fedjax_fm_kernels.topk_threshold import topk_threshold_reference
