"""The vectorised federated round: client training, strategies, server update."""

from fedjax_fm.engine import uplink
from fedjax_fm.engine import fednova
from fedjax_fm.engine import heterogeneity
from fedjax_fm.engine import scaffold
from fedjax_fm.engine import zeroth_order
from fedjax_fm.engine.client import make_client_update
from fedjax_fm.engine.client import masked_mean_loss
from fedjax_fm.engine.optimizers import CLIENT_OPTIMIZERS
from fedjax_fm.engine.optimizers import SERVER_OPTIMIZERS
from fedjax_fm.engine.optimizers import client_optimizer
from fedjax_fm.engine.optimizers import server_optimizer
from fedjax_fm.engine.round import DownlinkState
from fedjax_fm.engine.round import FederatedRound
from fedjax_fm.engine.round import PruneState
from fedjax_fm.engine.round import Pruning
from fedjax_fm.engine.round import ServerState
from fedjax_fm.engine.round import build_round
from fedjax_fm.engine.sampling import sample_clients
from fedjax_fm.engine.strategies import STRATEGIES
from fedjax_fm.engine.strategies import Reducer
from fedjax_fm.engine.strategies import clients_mesh
from fedjax_fm.engine.strategies import run_clients
from fedjax_fm.engine.sweep import Sweep
from fedjax_fm.engine.sweep import build_sweep
