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

This module never imports PyTorch.
"""

from jadam.torch._clip import clip_grad_norm as clip_grad_norm
from jadam.torch._clip import clip_grad_value as clip_grad_value
from jadam.torch._groups import path_string as path_string
from jadam.torch._optim import ASGD as ASGD
from jadam.torch._optim import SGD as SGD
from jadam.torch._optim import Adadelta as Adadelta
from jadam.torch._optim import Adagrad as Adagrad
from jadam.torch._optim import Adam as Adam
from jadam.torch._optim import Adamax as Adamax
from jadam.torch._optim import AdamW as AdamW
from jadam.torch._optim import NAdam as NAdam
from jadam.torch._optim import RAdam as RAdam
from jadam.torch._optim import RMSprop as RMSprop
from jadam.torch._optim import Rprop as Rprop
from jadam.torch._schedulers import CosineAnnealingLR as CosineAnnealingLR
from jadam.torch._schedulers import ChainedScheduler as ChainedScheduler
from jadam.torch._schedulers import ConstantLR as ConstantLR
from jadam.torch._schedulers import CosineAnnealingWarmRestarts as CosineAnnealingWarmRestarts
from jadam.torch._schedulers import CyclicLR as CyclicLR
from jadam.torch._schedulers import LambdaLR as LambdaLR
from jadam.torch._schedulers import MultiplicativeLR as MultiplicativeLR
from jadam.torch._schedulers import PolynomialLR as PolynomialLR
from jadam.torch._schedulers import SequentialLR as SequentialLR
from jadam.torch._schedulers import ExponentialLR as ExponentialLR
from jadam.torch._schedulers import LinearLR as LinearLR
from jadam.torch._schedulers import LRScheduler as LRScheduler
from jadam.torch._schedulers import MultiStepLR as MultiStepLR
from jadam.torch._schedulers import OneCycleLR as OneCycleLR
from jadam.torch._schedulers import ReduceLROnPlateau as ReduceLROnPlateau
from jadam.torch._schedulers import ReduceLROnPlateauState as ReduceLROnPlateauState
from jadam.torch._schedulers import StepLR as StepLR

__all__ = (
  "ASGD",
  "SGD",
  "Adadelta",
  "Adagrad",
  "Adam",
  "AdamW",
  "Adamax",
  "ChainedScheduler",
  "ConstantLR",
  "CosineAnnealingLR",
  "CosineAnnealingWarmRestarts",
  "CyclicLR",
  "ExponentialLR",
  "LRScheduler",
  "LambdaLR",
  "LinearLR",
  "MultiStepLR",
  "MultiplicativeLR",
  "NAdam",
  "OneCycleLR",
  "PolynomialLR",
  "RAdam",
  "RMSprop",
  "ReduceLROnPlateau",
  "ReduceLROnPlateauState",
  "Rprop",
  "SequentialLR",
  "StepLR",
  "clip_grad_norm",
  "clip_grad_value",
  "path_string",
)
