"""Server-side magnitude pruning: global masks, schedules, prune-and-regrow."""

from fedjax_fm.prune.magnitude import apply_masks
from fedjax_fm.prune.magnitude import global_magnitude_masks
from fedjax_fm.prune.magnitude import mask_nbytes
from fedjax_fm.prune.magnitude import mask_updates
from fedjax_fm.prune.magnitude import masks_changed
from fedjax_fm.prune.magnitude import pack_masks
from fedjax_fm.prune.magnitude import polynomial_schedule
from fedjax_fm.prune.magnitude import prune_and_regrow
from fedjax_fm.prune.magnitude import sparsity_of
