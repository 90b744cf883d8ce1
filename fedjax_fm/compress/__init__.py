"""Compression operators applied to client updates before aggregation."""

from fedjax_fm.compress.base import Compressor
from fedjax_fm.compress.base import identity
from fedjax_fm.compress.base import payload_nbytes
