"""Aggregation of client updates."""

from fedjax_fm.aggregate.base import StreamingAggregator
from fedjax_fm.aggregate.mean import weighted_mean
