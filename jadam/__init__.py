"""jadam: Adam, and the optimizers around it, as small pure Optax gradient transformations.

Each line of Adam's Algorithm 1 is one transformation, and each optimizer a
chain of them::

    add_l2 -> scale_by_moments -> [max_nu] -> bias_correct -> normalize -> scale_by_lr
"""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it


# Public submodules (jadam.keras.Adam, jadam.torch.Adam), left out of __all__: `from jadam import *`
# must not shadow PyTorch's `torch` or Keras's `keras`.
from jadam import keras as keras
from jadam import torch as torch
from jadam._checkpoint import restore_state as restore_state
from jadam._checkpoint import save_state as save_state
from jadam._lbfgs import LbfgsState as LbfgsState
from jadam._lbfgs import lbfgs as lbfgs
from jadam._optimizers import adadelta as adadelta

# Adafactor and Muon
from jadam._optimizers import adafactor as adafactor
from jadam._optimizers import adagrad as adagrad
from jadam._optimizers import adam as adam
from jadam._optimizers import adam8bit as adam8bit
from jadam._optimizers import adamax as adamax
from jadam._optimizers import adamw as adamw
from jadam._optimizers import adamw8bit as adamw8bit
from jadam._optimizers import asgd as asgd
from jadam._optimizers import muon as muon
from jadam._optimizers import nadam as nadam
from jadam._optimizers import radam as radam
from jadam._optimizers import rmsprop as rmsprop
from jadam._optimizers import rprop as rprop
from jadam._optimizers import sgd as sgd
from jadam._optimizers import sparse_adam as sparse_adam
from jadam._stages.correct import NesterovCorrectState as NesterovCorrectState
from jadam._stages.correct import bias_correct as bias_correct
from jadam._stages.correct import nesterov_correct as nesterov_correct
from jadam._stages.correct import rectify as rectify
from jadam._stages.factored import ScaleByFactoredMomentsState as ScaleByFactoredMomentsState
from jadam._stages.factored import clip_by_rms as clip_by_rms
from jadam._stages.factored import scale_by_factored_moments as scale_by_factored_moments
from jadam._stages.factored import scale_by_param_rms as scale_by_param_rms
from jadam._stages.factored import scale_by_relative_step as scale_by_relative_step
from jadam._stages.moments import AccumulateSquaresState as AccumulateSquaresState
from jadam._stages.moments import MaxNuState as MaxNuState
from jadam._stages.moments import Moments as Moments
from jadam._stages.moments import ScaleByInfMomentsState as ScaleByInfMomentsState
from jadam._stages.moments import ScaleByMomentsState as ScaleByMomentsState
from jadam._stages.moments import accumulate_squares as accumulate_squares
from jadam._stages.moments import center as center
from jadam._stages.moments import max_nu as max_nu
from jadam._stages.moments import scale_by_inf_moments as scale_by_inf_moments
from jadam._stages.moments import scale_by_moments as scale_by_moments
from jadam._stages.orthogonal import orthogonalize as orthogonalize
from jadam._stages.penalty import AddL2State as AddL2State
from jadam._stages.penalty import DecoupledDecayState as DecoupledDecayState
from jadam._stages.penalty import add_l2 as add_l2
from jadam._stages.penalty import decoupled_decay as decoupled_decay
from jadam._stages.scale import MomentumState as MomentumState
from jadam._stages.scale import ScaleByAsgdState as ScaleByAsgdState
from jadam._stages.scale import ScaleByDeltaState as ScaleByDeltaState
from jadam._stages.scale import ScaleByLrState as ScaleByLrState
from jadam._stages.scale import ScaleByRpropState as ScaleByRpropState
from jadam._stages.scale import flip_sign as flip_sign
from jadam._stages.scale import momentum as momentum
from jadam._stages.scale import normalize as normalize
from jadam._stages.scale import normalize_inf as normalize_inf
from jadam._stages.scale import scale_by_asgd as scale_by_asgd
from jadam._stages.scale import scale_by_delta as scale_by_delta
from jadam._stages.scale import scale_by_lr as scale_by_lr
from jadam._stages.scale import scale_by_rprop as scale_by_rprop
from jadam._stages.sparse import RowMoments as RowMoments
from jadam._stages.sparse import ScaleBySparseMomentsState as ScaleBySparseMomentsState
from jadam._stages.sparse import apply_updates as apply_updates
from jadam._stages.sparse import rowwise as rowwise
from jadam._stages.sparse import scale_by_sparse_moments as scale_by_sparse_moments
from jadam._stages.sparse import value_and_sparse_grad as value_and_sparse_grad
from jadam._step import make_train_step as make_train_step
from jadam._step import make_update_step as make_update_step
from jadam._step import update_and_apply as update_and_apply
from jadam._storage.quantize import Quantized as Quantized
from jadam._storage.quantize import QuantizedMoment as QuantizedMoment
from jadam._tuning.early_stopping import EarlyStopping as EarlyStopping
from jadam._tuning.early_stopping import EarlyStoppingState as EarlyStoppingState
from jadam._tuning.early_stopping import early_stopping as early_stopping
from jadam._tuning.sweep import Sweep as Sweep
from jadam._tuning.sweep import SweepState as SweepState
from jadam._tuning.sweep import sweep as sweep
from jadam._tuning.sweep import sweep_grid as sweep_grid

__version__ = "0.1.0"

__all__ = (
  "AccumulateSquaresState",
  "AddL2State",
  "DecoupledDecayState",
  "EarlyStopping",
  "EarlyStoppingState",
  "LbfgsState",
  "MaxNuState",
  "Moments",
  "MomentumState",
  "NesterovCorrectState",
  "Quantized",
  "QuantizedMoment",
  "RowMoments",
  "ScaleByAsgdState",
  "ScaleByDeltaState",
  "ScaleByFactoredMomentsState",
  "ScaleByInfMomentsState",
  "ScaleByLrState",
  "ScaleByMomentsState",
  "ScaleByRpropState",
  "ScaleBySparseMomentsState",
  "Sweep",
  "SweepState",
  "accumulate_squares",
  "adadelta",
  "adafactor",
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
  "clip_by_rms",
  "decoupled_decay",
  "early_stopping",
  "flip_sign",
  "lbfgs",
  "make_train_step",
  "make_update_step",
  "max_nu",
  "momentum",
  "muon",
  "nadam",
  "nesterov_correct",
  "normalize",
  "normalize_inf",
  "orthogonalize",
  "radam",
  "rectify",
  "restore_state",
  "rmsprop",
  "rowwise",
  "rprop",
  "save_state",
  "scale_by_asgd",
  "scale_by_delta",
  "scale_by_factored_moments",
  "scale_by_inf_moments",
  "scale_by_lr",
  "scale_by_moments",
  "scale_by_param_rms",
  "scale_by_relative_step",
  "scale_by_rprop",
  "scale_by_sparse_moments",
  "sgd",
  "sparse_adam",
  "sweep",
  "sweep_grid",
  "update_and_apply",
  "value_and_sparse_grad",
)
