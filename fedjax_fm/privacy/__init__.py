"""Differential privacy and secure aggregation for federated learning."""

from fedjax_fm.privacy.accounting import Accountant
from fedjax_fm.privacy.accounting import SkellamAccountant
from fedjax_fm.privacy.accounting import dp_event
from fedjax_fm.privacy.accounting import epsilon
from fedjax_fm.privacy.accounting import noise_multiplier_for_epsilon
from fedjax_fm.privacy.accounting import skellam_epsilon
from fedjax_fm.privacy.accounting import skellam_noise_multiplier_for_epsilon
from fedjax_fm.privacy.accounting import skellam_rdp
from fedjax_fm.privacy.adaptive import AdaptiveClip
from fedjax_fm.privacy.adaptive import AdaptiveClipState
from fedjax_fm.privacy.adaptive import quantile_adaptive_clip
from fedjax_fm.privacy.adaptive import update_noise_multiplier
from fedjax_fm.privacy.audit import AuditResult
from fedjax_fm.privacy.audit import canary_update
from fedjax_fm.privacy.audit import empirical_epsilon
from fedjax_fm.privacy.clipping import clip_flat
from fedjax_fm.privacy.clipping import clip_per_layer
from fedjax_fm.privacy.clipping import global_norm
from fedjax_fm.privacy.dp_fedavg import Privacy
from fedjax_fm.privacy.dp_fedavg import add_gaussian_noise
from fedjax_fm.privacy.dp_fedavg import fixed_denominator_mean
from fedjax_fm.privacy.dp_fedavg import gaussian_dp
from fedjax_fm.privacy.distributed import skellam_dp
from fedjax_fm.privacy.distributed import skellam_mechanism
from fedjax_fm.privacy.distributed import skellam_params
from fedjax_fm.privacy import accounting
from fedjax_fm.privacy import adaptive
from fedjax_fm.privacy import audit
from fedjax_fm.privacy import clipping
from fedjax_fm.privacy import distributed
from fedjax_fm.privacy import dp_fedavg
from fedjax_fm.privacy import membership
from fedjax_fm.privacy import secure_agg

# DP-FedAvg (McMahan et al. 2018): per-client clipping, Gaussian noise on the mean.
DPFedAvg = gaussian_dp
