"""jadam: Adam, and the optimizers around it, as small pure Optax gradient transformations.

Each line of Adam's Algorithm 1 is one transformation, and each optimizer a
chain of them::

    add_l2 -> scale_by_moments -> [max_nu] -> bias_correct -> normalize -> scale_by_lr
"""

from jadam._alias import adadelta as adadelta
from jadam._alias import adagrad as adagrad
from jadam._alias import adam as adam
from jadam._alias import adam8bit as adam8bit
from jadam._alias import adamax as adamax
from jadam._alias import adamw as adamw
from jadam._alias import adamw8bit as adamw8bit
from jadam._alias import asgd as asgd
from jadam._alias import nadam as nadam
from jadam._alias import radam as radam
from jadam._alias import rmsprop as rmsprop
from jadam._alias import rprop as rprop
from jadam._alias import sgd as sgd
from jadam._alias import sparse_adam as sparse_adam
from jadam._checkpoint import restore_state as restore_state
from jadam._checkpoint import save_state as save_state
from jadam._correct import NesterovCorrectState as NesterovCorrectState
from jadam._correct import bias_correct as bias_correct
from jadam._correct import nesterov_correct as nesterov_correct
from jadam._correct import rectify as rectify
from jadam._early_stopping import EarlyStopping as EarlyStopping
from jadam._early_stopping import EarlyStoppingState as EarlyStoppingState
from jadam._early_stopping import early_stopping as early_stopping
from jadam._moments import AccumulateSquaresState as AccumulateSquaresState
from jadam._moments import MaxNuState as MaxNuState
from jadam._moments import Moments as Moments
from jadam._moments import ScaleByInfMomentsState as ScaleByInfMomentsState
from jadam._moments import ScaleByMomentsState as ScaleByMomentsState
from jadam._moments import accumulate_squares as accumulate_squares
from jadam._moments import center as center
from jadam._moments import max_nu as max_nu
from jadam._moments import scale_by_inf_moments as scale_by_inf_moments
from jadam._moments import scale_by_moments as scale_by_moments
from jadam._penalty import AddL2State as AddL2State
from jadam._penalty import DecoupledDecayState as DecoupledDecayState
from jadam._penalty import add_l2 as add_l2
from jadam._penalty import decoupled_decay as decoupled_decay
from jadam._quantize import Quantized as Quantized
from jadam._quantize import QuantizedMoment as QuantizedMoment
from jadam._scale import MomentumState as MomentumState
from jadam._scale import ScaleByAsgdState as ScaleByAsgdState
from jadam._scale import ScaleByDeltaState as ScaleByDeltaState
from jadam._scale import ScaleByLrState as ScaleByLrState
from jadam._scale import ScaleByRpropState as ScaleByRpropState
from jadam._scale import flip_sign as flip_sign
from jadam._scale import momentum as momentum
from jadam._scale import normalize as normalize
from jadam._scale import normalize_inf as normalize_inf
from jadam._scale import scale_by_asgd as scale_by_asgd
from jadam._scale import scale_by_delta as scale_by_delta
from jadam._scale import scale_by_lr as scale_by_lr
from jadam._scale import scale_by_rprop as scale_by_rprop
from jadam._sparse import RowMoments as RowMoments
from jadam._sparse import ScaleBySparseMomentsState as ScaleBySparseMomentsState
from jadam._sparse import apply_updates as apply_updates
from jadam._sparse import rowwise as rowwise
from jadam._sparse import scale_by_sparse_moments as scale_by_sparse_moments
from jadam._sparse import value_and_sparse_grad as value_and_sparse_grad
from jadam._step import make_train_step as make_train_step
from jadam._step import make_update_step as make_update_step
from jadam._step import update_and_apply as update_and_apply
from jadam._sweep import Sweep as Sweep
from jadam._sweep import SweepState as SweepState
from jadam._sweep import sweep as sweep
from jadam._sweep import sweep_grid as sweep_grid

# Public submodules (jadam.keras.Adam, jadam.torch.Adam), left out of __all__: `from jadam import *`
# must not shadow PyTorch's `torch` or Keras's `keras`.
from jadam import keras as keras
from jadam import torch as torch

__version__ = "0.1.0"

__all__ = (
  "AccumulateSquaresState",
  "AddL2State",
  "DecoupledDecayState",
  "EarlyStopping",
  "EarlyStoppingState",
  "MaxNuState",
  "Moments",
  "MomentumState",
  "NesterovCorrectState",
  "Quantized",
  "QuantizedMoment",
  "RowMoments",
  "ScaleByAsgdState",
  "ScaleByDeltaState",
  "ScaleByInfMomentsState",
  "ScaleByLrState",
  "ScaleByMomentsState",
  "ScaleByRpropState",
  "ScaleBySparseMomentsState",
  "Sweep",
  "SweepState",
  "accumulate_squares",
  "adadelta",
  "adagrad",
  "adam",
  "adam8bit",
  "adamax",
  "adamw",
  "adamw8bit",
  "add_l2",
  "apply_updates",
  "asgd",
  "bias_correct",
  "center",
  "decoupled_decay",
  "early_stopping",
  "flip_sign",
  "make_train_step",
  "make_update_step",
  "max_nu",
  "momentum",
  "nadam",
  "nesterov_correct",
  "normalize",
  "normalize_inf",
  "radam",
  "rectify",
  "restore_state",
  "rmsprop",
  "rowwise",
  "rprop",
  "save_state",
  "scale_by_asgd",
  "scale_by_delta",
  "scale_by_inf_moments",
  "scale_by_lr",
  "scale_by_moments",
  "scale_by_rprop",
  "scale_by_sparse_moments",
  "sgd",
  "sparse_adam",
  "sweep",
  "sweep_grid",
  "update_and_apply",
  "value_and_sparse_grad",
)
