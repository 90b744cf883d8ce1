"""Compression operators applied to client updates before aggregation."""

from fedjax_fm.compress.base import Compressor
from fedjax_fm.compress.base import identity
from fedjax_fm.compress.base import payload_nbytes
from fedjax_fm.compress.bitpack import pack_bits
from fedjax_fm.compress.bitpack import unpack_bits
from fedjax_fm.compress.chain import ChainPayload
from fedjax_fm.compress.chain import chain
from fedjax_fm.compress.chain import nbytes_formula
from fedjax_fm.compress.error_feedback import ErrorFeedbackState
from fedjax_fm.compress.error_feedback import error_feedback
from fedjax_fm.compress.lowrank import LowRankPayload
from fedjax_fm.compress.lowrank import powersgd
from fedjax_fm.compress.lowrank import svd
from fedjax_fm.compress.quantize import QuantizedPayload
from fedjax_fm.compress.quantize import deterministic
from fedjax_fm.compress.quantize import qsgd
from fedjax_fm.compress.quantize import sign
from fedjax_fm.compress.quantize import stochastic_uniform
from fedjax_fm.compress.quantize import ternary
from fedjax_fm.compress.registry import COMPRESSORS
from fedjax_fm.compress.registry import get_compressor
from fedjax_fm.compress.sparsify import SeededSparsePayload
from fedjax_fm.compress.sparsify import SparsePayload
from fedjax_fm.compress.sparsify import random_k
from fedjax_fm.compress.sparsify import threshold
from fedjax_fm.compress.sparsify import top_k
