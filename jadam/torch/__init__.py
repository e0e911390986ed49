"""PyTorch's front door: `torch.optim` optimizers and schedulers with PyTorch's names and semantics.

Each optimizer takes PyTorch's arguments and defaults and returns an
:class:`optax.GradientTransformation` made of jadam's stages; each scheduler is
an Optax schedule (a function of the optimizer step count)::

    # torch                                          # jadam
    opt = torch.optim.AdamW(model.parameters(),      tx = jadam.torch.AdamW(lr=3e-4,
        lr=3e-4, weight_decay=0.05)                      weight_decay=0.05)

Parameter groups are a list of dicts whose ``"params"`` selects leaves of the
parameter pytree by a regular expression on the ``/``-joined key path or by a
predicate ``(path, leaf) -> bool``; see :func:`Adam`. They are
`optax.partition` underneath.

A PyTorch run moves over with its optimizer state: :func:`load_state_dict`
turns `optimizer.state_dict()` into the jadam state, :func:`state_dict` gives it
back (see :func:`flax_names` for a Flax model's names and kernel transposes).

This module imports PyTorch only inside the state dict functions.
"""

from jadam.torch._clip import clip_grad_norm as clip_grad_norm
from jadam.torch._clip import clip_grad_value as clip_grad_value
from jadam.torch._groups import path_string as path_string
from jadam.torch._optim import ASGD as ASGD
from jadam.torch._optim import LBFGS as LBFGS
from jadam.torch._optim import SGD as SGD
from jadam.torch._optim import Adadelta as Adadelta

# Adafactor and Muon
from jadam.torch._optim import Adafactor as Adafactor
from jadam.torch._optim import Adagrad as Adagrad
from jadam.torch._optim import Adam as Adam
from jadam.torch._optim import Adam8bit as Adam8bit
from jadam.torch._optim import Adamax as Adamax
from jadam.torch._optim import AdamW as AdamW
from jadam.torch._optim import AdamW8bit as AdamW8bit
from jadam.torch._optim import Muon as Muon
from jadam.torch._optim import NAdam as NAdam
from jadam.torch._optim import RAdam as RAdam
from jadam.torch._optim import RMSprop as RMSprop
from jadam.torch._optim import Rprop as Rprop
from jadam.torch._optim import SparseAdam as SparseAdam
from jadam.torch._schedulers import ChainedScheduler as ChainedScheduler
from jadam.torch._schedulers import ConstantLR as ConstantLR
from jadam.torch._schedulers import CosineAnnealingLR as CosineAnnealingLR
from jadam.torch._schedulers import CosineAnnealingWarmRestarts as CosineAnnealingWarmRestarts
from jadam.torch._schedulers import CyclicLR as CyclicLR
from jadam.torch._schedulers import ExponentialLR as ExponentialLR
from jadam.torch._schedulers import LambdaLR as LambdaLR
from jadam.torch._schedulers import LinearLR as LinearLR
from jadam.torch._schedulers import LRScheduler as LRScheduler
from jadam.torch._schedulers import MultiplicativeLR as MultiplicativeLR
from jadam.torch._schedulers import MultiStepLR as MultiStepLR
from jadam.torch._schedulers import OneCycleLR as OneCycleLR
from jadam.torch._schedulers import PolynomialLR as PolynomialLR
from jadam.torch._schedulers import ReduceLROnPlateau as ReduceLROnPlateau
from jadam.torch._schedulers import ReduceLROnPlateauState as ReduceLROnPlateauState
from jadam.torch._schedulers import SequentialLR as SequentialLR
from jadam.torch._schedulers import StepLR as StepLR
from jadam.torch._state_dict import TorchName as TorchName
from jadam.torch._state_dict import flax_names as flax_names
from jadam.torch._state_dict import load_checkpoint as load_checkpoint
from jadam.torch._state_dict import load_state_dict as load_state_dict
from jadam.torch._state_dict import scheduler_state_dict as scheduler_state_dict
from jadam.torch._state_dict import state_dict as state_dict

__all__ = (
  "ASGD",
  "Adadelta",
  "Adafactor",
  "Adagrad",
  "Adam",
  "Adam8bit",
  "AdamW",
  "AdamW8bit",
  "Adamax",
  "ChainedScheduler",
  "ConstantLR",
  "CosineAnnealingLR",
  "CosineAnnealingWarmRestarts",
  "CyclicLR",
  "ExponentialLR",
  "LBFGS",
  "LRScheduler",
  "LambdaLR",
  "LinearLR",
  "MultiStepLR",
  "MultiplicativeLR",
  "Muon",
  "NAdam",
  "OneCycleLR",
  "PolynomialLR",
  "RAdam",
  "RMSprop",
  "ReduceLROnPlateau",
  "ReduceLROnPlateauState",
  "Rprop",
  "SGD",
  "SequentialLR",
  "SparseAdam",
  "StepLR",
  "TorchName",
  "clip_grad_norm",
  "clip_grad_value",
  "flax_names",
  "load_checkpoint",
  "load_state_dict",
  "path_string",
  "scheduler_state_dict",
  "state_dict",
)
