"""Aggregation of client updates."""

from fedjax_fm.aggregate.base import StreamingAggregator
from fedjax_fm.aggregate.mean import weighted_mean
from fedjax_fm.aggregate.attacks import apply_attack
from fedjax_fm.aggregate.attacks import choose_attackers
from fedjax_fm.aggregate.robust import StackedAggregator
from fedjax_fm.aggregate.robust import coordinate_median
from fedjax_fm.aggregate.robust import finite_mask
from fedjax_fm.aggregate.robust import geometric_median
from fedjax_fm.aggregate.robust import krum
from fedjax_fm.aggregate.robust import multi_krum
from fedjax_fm.aggregate.robust import norm_bounded_mean
from fedjax_fm.aggregate.robust import trimmed_mean
