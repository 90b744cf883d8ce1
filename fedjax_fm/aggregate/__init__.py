"""Aggregation of client updates: one contract, streaming and whole-round kinds."""

from fedjax_fm.aggregate.attacks import apply_attack
from fedjax_fm.aggregate.attacks import choose_attackers
from fedjax_fm.aggregate.base import Aggregator
from fedjax_fm.aggregate.base import BaseMerge
from fedjax_fm.aggregate.base import RoundContext
from fedjax_fm.aggregate.base import reduce
from fedjax_fm.aggregate.base import streaming
from fedjax_fm.aggregate.base import whole_round
from fedjax_fm.aggregate.mean import weighted_mean
from fedjax_fm.aggregate.robust import coordinate_median
from fedjax_fm.aggregate.robust import finite_mask
from fedjax_fm.aggregate.robust import geometric_median
from fedjax_fm.aggregate.robust import krum
from fedjax_fm.aggregate.robust import multi_krum
from fedjax_fm.aggregate.robust import norm_bounded_mean
from fedjax_fm.aggregate.robust import trimmed_mean

median = coordinate_median   # the coordinate-wise median (Yin et al. 2018)
