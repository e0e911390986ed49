"""The optimizers: recipes of jadam's stages and Optax's, with PyTorch's semantics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from jadam._core import common as _common
from jadam._core import hparams as _hparams
from jadam._core import registry as _registry
from jadam._stages import factored as _factored
from jadam._stages import orthogonal as _orthogonal
from jadam._stages import scale as _scale
from jadam._stages import sparse as _sparse
from jadam._stages.correct import bias_correct, nesterov_correct, rectify
from jadam._stages.moments import accumulate_squares, center, max_nu, scale_by_inf_moments, scale_by_moments
from jadam._stages.penalty import add_l2, decoupled_decay
from jadam._stages.scale import (
  flip_sign,
  normalize,
  normalize_inf,
  scale_by_asgd,
  scale_by_delta,
  scale_by_lr,
  scale_by_rprop,
)
from jadam._storage import quantize as _quantize

Dtype = Any
Mask = Any | Callable[[optax.Params], Any] | None


def torch_front(maximize: bool, weight_decay: optax.ScalarOrSchedule | None) -> list[optax.GradientTransformation]:
  """PyTorch's first two lines: negate if maximizing, then add the coupled L2 term.

  The L2 stage is there for any `weight_decay`, zero included (it then adds
  nothing and needs no params), so that the chain's structure never depends
  on a number: `optax.inject_hyperparams` turns the number into an array and
  must find the same state. `None` (decoupled decay elsewhere) leaves it out.
  """
  _hparams.check_flag("maximize", maximize)
  stages = [flip_sign()] if maximize else []
  if weight_decay is not None:
    stages.append(add_l2(weight_decay))
  return stages


def adam(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  eps_root: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  amsgrad: bool = False,
  maximize: bool = False,
  mu_dtype: Dtype | None = None,
  nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""Adam, with the semantics of `torch.optim.Adam`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1}
            && \text{(maximize; coupled L2: \texttt{add\_l2})}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2
            && \text{(\texttt{scale\_by\_moments})}\\
        v_t &\leftarrow \max(v_{t-1}^{\max}, v_t)
            && \text{(amsgrad only: \texttt{max\_nu})}\\
        \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t)
            && \text{(\texttt{bias\_correct})}\\
        u_t &= \hat m_t / (\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon)
            && \text{(\texttt{normalize})}\\
        \theta_t &= \theta_{t-1} - \alpha_t u_t
            && \text{(\texttt{scale\_by\_lr})}
      \end{align*}

  It departs from Algorithm 1 only where PyTorch does: `weight_decay` adds an
  L2 gradient (for decoupled decay use :func:`adamw`), and `amsgrad` keeps the
  maximum of the raw :math:`v_t` and corrects it with the current step. For
  Optax's AMSGrad (maximum of :math:`\hat v_t`) chain :func:`max_nu` after
  :func:`bias_correct` yourself. With `eps_root=0` and `weight_decay=0` it is
  `optax.adam`.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`, added outside the root.
    eps_root: :math:`\epsilon_{\text{root}} \ge 0`, added inside the root.
    weight_decay: :math:`\lambda \ge 0`, PyTorch's coupled L2.
    amsgrad: PyTorch's AMSGrad.
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m` (default: the parameter's).
    nu_dtype: Storage dtype of :math:`v` (default: the parameter's, widened to
      float32 at least).

  Every numeric argument may be a float, a scalar array or an Optax schedule,
  and `optax.inject_hyperparams(jadam.adam)` works (name `mu_dtype` and
  `nu_dtype` in its `static_args` if you set them).

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax, jadam
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), jadam.adam(1e-3))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state, params)
    >>> updates["w"]  # the first step is -lr * sign(g), whatever |g|
    Array([-0.001, -0.001, -0.001], dtype=float32)

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014;
    `torch.optim.Adam <https://pytorch.org/docs/stable/generated/torch.optim.Adam.html>`_.
  """
  return _adam_chain(
    "jadam.adam",
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    weight_decay,
    amsgrad,
    maximize,
    mu_dtype,
    nu_dtype,
    decoupled=False,
  )


def _adam_chain(
  name,
  learning_rate,
  b1,
  b2,
  eps,
  eps_root,
  weight_decay,
  amsgrad,
  maximize,
  mu_dtype,
  nu_dtype,
  *,
  decoupled,
  mask=None,
):
  """Adam's chain, the decay coupled (an L2 stage in front) or decoupled (an L2 stage before the rate).

  AMSGrad's maximum is kept in `nu_dtype`, or float32 and wider where the
  moments are 8-bit blocks (a running maximum cannot be requantized per step
  without drifting up).
  """
  _hparams.check_flag("amsgrad", amsgrad)
  if not decoupled:
    _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  max_dtype = None if isinstance(nu_dtype, _quantize.Quantized) else nu_dtype
  return _registry.optimizer_chain(
    name,
    *torch_front(maximize, None if decoupled else weight_decay),
    scale_by_moments(b1, b2, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
    *([max_nu(nu_dtype=max_dtype)] if amsgrad else []),
    bias_correct(),
    normalize(eps, eps_root=eps_root),
    *([add_l2(weight_decay, mask=mask)] if decoupled else []),
    scale_by_lr(learning_rate),
  )


def adamw(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  eps_root: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 1e-2,
  amsgrad: bool = False,
  maximize: bool = False,
  mask: Mask = None,
  mu_dtype: Dtype | None = None,
  nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""AdamW: Adam with decoupled weight decay, as `torch.optim.AdamW` and `optax.adamw`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t && \text{(maximize)}\\
        m_t, v_t, \hat m_t, \hat v_t &\text{ as in } \texttt{adam}
            && \text{(amsgrad: max over raw } v_t\text{, as PyTorch)}\\
        \theta_t &= \theta_{t-1} - \alpha_t \left(
            \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon}
            + \lambda \theta_{t-1}\right)
            && \text{(\texttt{normalize}, \texttt{add\_l2}, \texttt{scale\_by\_lr})}
      \end{align*}

  The decay is :func:`add_l2` placed after :func:`normalize`, so it is scaled
  by the learning rate but not by the moments, which is PyTorch's
  :math:`\theta \leftarrow \theta (1 - \alpha\lambda)` followed by the Adam
  step. Its default :math:`\lambda = 10^{-2}` is PyTorch's (Optax's is
  :math:`10^{-4}`).

  Args:
    learning_rate: :math:`\alpha`.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`, outside the root.
    eps_root: :math:`\epsilon_{\text{root}} \ge 0`, inside the root.
    weight_decay: :math:`\lambda \ge 0`.
    amsgrad: PyTorch's AMSGrad.
    maximize: Ascend the objective instead.
    mask: Where the decay applies: a tree of booleans shaped like (a prefix of)
      the params, or a callable returning one (e.g. skip biases and norms).
    mu_dtype: Storage dtype of :math:`m`.
    nu_dtype: Storage dtype of :math:`v`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return _adam_chain(
    "jadam.adamw",
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    weight_decay,
    amsgrad,
    maximize,
    mu_dtype,
    nu_dtype,
    decoupled=True,
    mask=mask,
  )


def rmsprop(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  alpha: optax.ScalarOrSchedule = 0.99,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  momentum: optax.ScalarOrSchedule | None = None,
  centered: bool = False,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""RMSProp, with the semantics and defaults of `torch.optim.RMSprop`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1}
            && \text{(\texttt{add\_l2})}\\
        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2, \quad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t
            && \text{(\texttt{scale\_by\_moments}; } \bar g \text{ if centered)}\\
        u_t &= g_t / (\sqrt{v_t - \bar g_t^2} + \epsilon)
            && \text{(\texttt{center}, \texttt{normalize}; no } \bar g_t^2 \text{ if not centered)}\\
        b_t &= \mu b_{t-1} + u_t, \quad u_t \leftarrow b_t
            && \text{(\texttt{momentum}, unless } \mu \text{ is None)}\\
        \theta_t &= \theta_{t-1} - \alpha_t u_t && \text{(\texttt{scale\_by\_lr})}
      \end{align*}

  This is Adam without bias correction and with :math:`\beta_1 = 0`: momentum
  is applied after the division, as PyTorch does, and :math:`\epsilon` outside
  the root (Optax's `rmsprop` puts it inside). Defaults are PyTorch's: lr
  :math:`10^{-2}`, :math:`\alpha = 0.99`, :math:`\epsilon = 10^{-8}`.

  Args:
    learning_rate: the step size :math:`\alpha_t`.
    alpha: the smoothing constant, in [0, 1).
    eps: :math:`\epsilon \ge 0`.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    momentum: :math:`\mu \in [0, 1]`, or ``None`` (the default, as `optax.rmsprop`): no
      momentum stage and no buffer. A number, zero included, keeps the stage, so
      the state's structure does not depend on its value (PyTorch's default is 0).
    centered: divide by the estimated standard deviation instead of the root
      mean square.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Tieleman & Hinton, Lecture 6.5, COURSERA: Neural Networks for Machine
    Learning, 2012; Graves, 2013 (centred).
  """
  _hparams.check_flag("centered", centered)
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.rmsprop",
    *torch_front(maximize, weight_decay),
    scale_by_moments(alpha if centered else None, alpha),
    *([center()] if centered else []),
    normalize(eps),
    *([] if momentum is None else [_scale.momentum(momentum)]),
    scale_by_lr(learning_rate),
  )


def sgd(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  momentum: optax.ScalarOrSchedule | None = None,
  dampening: optax.ScalarOrSchedule = 0.0,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  nesterov: bool = False,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Stochastic gradient descent with momentum, as `torch.optim.SGD`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        b_1 &= g_1, \quad b_t = \mu b_{t-1} + (1-\tau) g_t && \text{(\texttt{momentum})}\\
        u_t &= g_t + \mu b_t \text{ (nesterov)}, \quad u_t = b_t \text{ (otherwise)}\\
        \theta_t &= \theta_{t-1} - \alpha_t u_t && \text{(\texttt{scale\_by\_lr})}
      \end{align*}

  Defaults are PyTorch's (lr :math:`10^{-3}`, no momentum). Nesterov needs a
  momentum and zero dampening, as in PyTorch.

  Args:
    learning_rate: :math:`\alpha_t`.
    momentum: :math:`\mu \in [0, 1]`, or ``None`` (the default, as `optax.sgd`): no
      momentum stage and no buffer. A number, zero included, keeps the stage (and
      its buffer), so the state's structure does not depend on its value and
      `optax.inject_hyperparams` finds the same state; :math:`\mu = 0` then
      passes the gradient through, as PyTorch's default does.
    dampening: :math:`\tau \in [0, 1]`.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    nesterov: Nesterov momentum.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  _hparams.check_flag("nesterov", nesterov)
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  if nesterov and (momentum is None or _hparams.is_zero(momentum)):
    raise ValueError("Nesterov momentum requires a momentum and zero dampening.")
  stages = torch_front(maximize, weight_decay)
  if momentum is not None:  # as torch, which ignores dampening without momentum
    # A row-sparse gradient: as torch, no momentum passes it on; a momentum buffer makes it dense.
    sparse_ok = _sparse.dense_rows(
      _scale.momentum(momentum, dampening=dampening, nesterov=nesterov), pass_through=_hparams.is_zero(momentum)
    )
    stages.append(sparse_ok)
  else:
    _hparams.check_hyperparameter("dampening", dampening, low=0.0, high=1.0)
  return _registry.optimizer_chain("jadam.sgd", *stages, scale_by_lr(learning_rate))


def adagrad(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  lr_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  initial_accumulator_value: float = 0.0,
  eps: optax.ScalarOrSchedule = 1e-10,
  *,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Adagrad, with the semantics and defaults of `torch.optim.Adagrad`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        v_t &= v_{t-1} + g_t^2, \quad v_0 = \text{initial\_accumulator\_value}
            && \text{(\texttt{accumulate\_squares})}\\
        \theta_t &= \theta_{t-1} - \frac{\alpha}{1 + (t-1)\,\eta}\;
            \frac{g_t}{\sqrt{v_t} + \epsilon}
            && \text{(\texttt{normalize}, \texttt{scale\_by\_lr})}
      \end{align*}

  where :math:`\eta` is `lr_decay`. Defaults are PyTorch's (lr
  :math:`10^{-2}`, :math:`\epsilon = 10^{-10}`); Optax's `adagrad` starts its
  accumulator at 0.1 and puts :math:`\epsilon` inside the root.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    lr_decay: :math:`\eta \ge 0`.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    initial_accumulator_value: :math:`v_0 \ge 0`.
    eps: :math:`\epsilon \ge 0`.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Duchi, Hazan & Singer, JMLR 2011.
  """
  _hparams.check_learning_rate(learning_rate)
  _hparams.check_hyperparameter("lr_decay", lr_decay, low=0.0)
  lr = learning_rate
  if not _hparams.is_zero(lr_decay):
    lr_fn, decay_fn = _hparams.as_schedule(learning_rate, "learning_rate"), _hparams.as_schedule(lr_decay, "lr_decay")

    def lr(count):
      # Cast both: a float32 array (as optax.inject_hyperparams makes) times a
      # float64 t under jax.enable_x64 is refused by strict promotion.
      dtype = _common.float_dtype()
      t = count.astype(dtype)
      base = _hparams.cast_hyperparameter(lr_fn(count), dtype)
      return base / (1 + t * _hparams.cast_hyperparameter(decay_fn(count), dtype))

  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.adagrad",
    *torch_front(maximize, weight_decay),
    _sparse.accumulate_rows_of(accumulate_squares(initial_accumulator_value)),  # row-sparse grads: torch's rule
    normalize(eps),
    scale_by_lr(lr),
  )


def _tail(
  direction: list[optax.GradientTransformation],
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule,
  decoupled_weight_decay: bool,
) -> list[optax.GradientTransformation]:
  """The step, then PyTorch's decoupled decay if asked for."""
  # The flag, not the value, decides: a zero decay keeps its stage (see torch_front).
  decay = [decoupled_decay(weight_decay, learning_rate)] if decoupled_weight_decay else []
  return [*direction, scale_by_lr(learning_rate), *decay]


def adamax(
  learning_rate: optax.ScalarOrSchedule = 2e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  maximize: bool = False,
  mu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""Adamax, with the semantics and defaults of `torch.optim.Adamax`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)
            && \text{(\texttt{scale\_by\_inf\_moments})}\\
        \theta_t &= \theta_{t-1} - \frac{\alpha_t}{1 - \beta_1^t}\, \frac{m_t}{u_t}
            && \text{(\texttt{bias\_correct}, \texttt{normalize\_inf}, \texttt{scale\_by\_lr})}
      \end{align*}

  Unlike `optax.adamax`, :math:`\epsilon` is inside the maximum (PyTorch's
  choice) and the default learning rate is PyTorch's :math:`2\cdot10^{-3}`.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Kingma & Ba, `Adam <https://arxiv.org/abs/1412.6980>`_, 2014, Algorithm 2.
  """
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.adamax",
    *torch_front(maximize, weight_decay),
    scale_by_inf_moments(b1, b2, eps, mu_dtype=mu_dtype),
    bias_correct(),
    normalize_inf(),
    scale_by_lr(learning_rate),
  )


def nadam(
  learning_rate: optax.ScalarOrSchedule = 2e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  momentum_decay: optax.ScalarOrSchedule = 4e-3,
  decoupled_weight_decay: bool = False,
  maximize: bool = False,
  mu_dtype: Dtype | None = None,
  nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""NAdam, with the semantics and defaults of `torch.optim.NAdam`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1}
            && \text{(coupled L2 unless decoupled)}\\
        m_t, v_t &\text{ as in Adam} && \text{(\texttt{scale\_by\_moments})}\\
        \hat m_t &= \frac{1-\mu_t}{1-\Pi_t} g_t + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}} m_t,
        \quad \hat v_t = \frac{v_t}{1-\beta_2^t}
            && \text{(\texttt{nesterov\_correct})}\\
        \theta_t &= [(1 - \alpha_t\lambda)]\,\theta_{t-1} - \alpha_t\frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon}
            && \text{(\texttt{normalize}, \texttt{scale\_by\_lr}, [\texttt{decoupled\_decay}])}
      \end{align*}

  with :math:`\mu_t = \beta_1(1 - \frac12 0.96^{t\psi})` (see
  :func:`nesterov_correct`). Unlike `optax.nadam`, the momentum follows
  Dozat's decay schedule, as PyTorch's does.

  Args:
    learning_rate: :math:`\alpha` (PyTorch's default :math:`2\cdot10^{-3}`).
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: :math:`\lambda \ge 0`.
    momentum_decay: :math:`\psi \ge 0`.
    decoupled_weight_decay: apply :math:`\lambda` as AdamW does (NAdamW).
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.
    nu_dtype: Storage dtype of :math:`v`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Dozat, ICLR 2016 workshop.
  """
  _hparams.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.nadam",
    *torch_front(maximize, None if decoupled_weight_decay else weight_decay),
    scale_by_moments(b1, b2, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
    *_tail([nesterov_correct(momentum_decay), normalize(eps)], learning_rate, weight_decay, decoupled_weight_decay),
  )


def radam(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  decoupled_weight_decay: bool = False,
  maximize: bool = False,
  mu_dtype: Dtype | None = None,
  nu_dtype: Dtype | None = None,
) -> optax.GradientTransformation:
  r"""RAdam, with the semantics and defaults of `torch.optim.RAdam`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1}
            && \text{(coupled L2 unless decoupled)}\\
        m_t, v_t &\text{ as in Adam} && \text{(\texttt{scale\_by\_moments})}\\
        u_t &= \hat m_t\, r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}
            \text{ if } \rho_t > 5 \text{ else } \hat m_t
            && \text{(\texttt{rectify})}\\
        \theta_t &= [(1 - \alpha_t\lambda)]\,\theta_{t-1} - \alpha_t u_t
            && \text{(\texttt{scale\_by\_lr}, [\texttt{decoupled\_decay}])}
      \end{align*}

  See :func:`rectify` for :math:`\rho_t` and :math:`r_t`. :math:`\epsilon` is
  added to the uncorrected root, as in PyTorch (Optax's `radam` adds it to the
  corrected one and has a threshold of 5 as well).

  Args:
    learning_rate: :math:`\alpha`.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    weight_decay: :math:`\lambda \ge 0`.
    decoupled_weight_decay: apply :math:`\lambda` as AdamW does.
    maximize: Ascend the objective instead.
    mu_dtype: Storage dtype of :math:`m`.
    nu_dtype: Storage dtype of :math:`v`.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Liu et al., ICLR 2020.
  """
  _hparams.check_flag("decoupled_weight_decay", decoupled_weight_decay)
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.radam",
    *torch_front(maximize, None if decoupled_weight_decay else weight_decay),
    scale_by_moments(b1, b2, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
    *_tail([rectify(eps)], learning_rate, weight_decay, decoupled_weight_decay),
  )


def adadelta(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  rho: optax.ScalarOrSchedule = 0.9,
  eps: optax.ScalarOrSchedule = 1e-6,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Adadelta, with the semantics and defaults of `torch.optim.Adadelta`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + \lambda\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        v_t &= \rho v_{t-1} + (1-\rho) g_t^2 && \text{(\texttt{scale\_by\_moments(None, }\rho))}\\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\, g_t, \quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2 && \text{(\texttt{scale\_by\_delta})}\\
        \theta_t &= \theta_{t-1} - \alpha_t \Delta_t && \text{(\texttt{scale\_by\_lr})}
      \end{align*}

  Args:
    learning_rate: :math:`\alpha` (PyTorch's default 1.0).
    rho: :math:`\rho \in [0, 1]`.
    eps: :math:`\epsilon \ge 0`, inside both roots.
    weight_decay: coupled L2 :math:`\lambda \ge 0`.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.

  References:
    Zeiler, 2012.
  """
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.adadelta",
    *torch_front(maximize, weight_decay),
    scale_by_moments(None, rho),
    scale_by_delta(rho, eps),
    scale_by_lr(learning_rate),
  )


def rprop(
  learning_rate: jax.typing.ArrayLike = 1e-2,
  etas: tuple[float, float] = (0.5, 1.2),
  step_sizes: tuple[float, float] = (1e-6, 50.0),
  *,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Rprop, with the semantics and defaults of `torch.optim.Rprop`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t && \text{(maximize)}\\
        s_t &= \operatorname{clip}(s_{t-1}\,\eta(g_t g_{t-1}), s_{\min}, s_{\max}), \quad
        \theta_t = \theta_{t-1} - \operatorname{sign}(g_t)\, s_t
            && \text{(\texttt{scale\_by\_rprop}, \texttt{scale\_by\_lr(1)})}
      \end{align*}

  See :func:`scale_by_rprop`. The learning rate is only the initial step size.

  Args:
    learning_rate: the initial step size (a number).
    etas: :math:`(\eta_-, \eta_+)`.
    step_sizes: :math:`(s_{\min}, s_{\max})`.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  _hparams.check_flag("maximize", maximize)
  return _registry.optimizer_chain(
    "jadam.rprop", *torch_front(maximize, None), scale_by_rprop(learning_rate, etas, step_sizes), scale_by_lr(1.0)
  )


def asgd(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  lambd: float = 1e-4,
  alpha: float = 0.75,
  t0: float = 1e6,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Averaged SGD, with the semantics and defaults of `torch.optim.ASGD`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t + w\,\theta_{t-1} && \text{(\texttt{add\_l2})}\\
        \theta_t &= \theta_{t-1}(1 - \lambda\eta_t) - \eta_t g_t, \quad
        \eta_{t+1} = \frac{\alpha_0}{(1 + \lambda\alpha_0 t)^{a}}
            && \text{(\texttt{scale\_by\_asgd}, \texttt{scale\_by\_lr(1)})}
      \end{align*}

  The averaged parameters :math:`\bar\theta` (PyTorch's `ax`) are in the
  :class:`ScaleByAsgdState` of the chain's state; see :func:`scale_by_asgd`.

  Args:
    learning_rate: :math:`\alpha_0 \ge 0`.
    lambd: the decay term :math:`\lambda`.
    alpha: the power :math:`a`.
    t0: the step at which averaging starts.
    weight_decay: coupled L2 :math:`w \ge 0`.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  _hparams.check_hyperparameter("weight_decay", weight_decay, low=0.0)
  return _registry.optimizer_chain(
    "jadam.asgd",
    *torch_front(maximize, weight_decay),
    scale_by_asgd(learning_rate, lambd, alpha, t0),
    scale_by_lr(1.0),
  )


def sparse_adam(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Lazy Adam for embedding tables, with the semantics of `torch.optim.SparseAdam`.

  Each gradient is row-sparse, a :class:`jax.experimental.sparse.BCOO` with
  indices ``(k, 1)`` and data ``(k, *table.shape[1:])`` (see
  :func:`jadam.value_and_sparse_grad`). With :math:`R` the rows present
  (duplicates summed) and :math:`t` the table's own step count:

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t && \text{(maximize: \texttt{flip\_sign})}\\
        m_{t,R} &= m_{t-1,R} + (1-\beta_1)(g_{t,R} - m_{t-1,R}), \quad
        v_{t,R} = v_{t-1,R} + (1-\beta_2)(g_{t,R}^2 - v_{t-1,R})
            && \text{(\texttt{scale\_by\_sparse\_moments})}\\
        u_{t,R} &= \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_{t,R}}{\sqrt{v_{t,R}} + \epsilon}
            && \text{(\texttt{bias\_correct(into\_step=True)}, \texttt{normalize}, row-wise)}\\
        \theta_{t,R} &= \theta_{t-1,R} - \alpha_t u_{t,R}
            && \text{(\texttt{scale\_by\_lr})}
      \end{align*}

  Rows outside :math:`R` are untouched: parameters and moments keep their bits
  (not decayed). :math:`\epsilon` is added to the uncorrected root, PyTorch's
  folded form. :math:`t` counts the steps on which the table had a gradient,
  an empty one (:math:`k = 0`) included, as PyTorch's `state["step"]` does; a
  `None` gradient leaves the table's count as it was. The learning-rate
  schedule reads the number of `update` calls. Dense gradients are refused,
  as PyTorch refuses them: give dense leaves another optimizer with
  `optax.partition`.

  The updates are row-sparse too (`BCOO`). :func:`jadam.update_and_apply`,
  :func:`jadam.make_update_step` and :func:`jadam.apply_updates` add them with
  a scatter into the touched rows, :math:`O(k d)` and in place in donated
  buffers; on the CPU the step helpers run the whole step as one compiled
  kernel call per table (the same bits as ``tx.update`` then
  :func:`jadam.apply_updates` op by op). ``optax.apply_updates`` gives the same
  parameters by way of ``BCOO.todense``, :math:`O(V d)` per table and step.

  Args:
    learning_rate: :math:`\alpha`: a float, a scalar array or a schedule.
    b1: :math:`\beta_1 \in [0, 1)`.
    b2: :math:`\beta_2 \in [0, 1)`.
    eps: :math:`\epsilon \ge 0`.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, jadam
    >>> from jax.experimental.sparse import BCOO
    >>> tx = jadam.sparse_adam(1e-3)
    >>> params = {"table": jnp.zeros((5, 2))}
    >>> grads = {"table": BCOO((jnp.ones((2, 2)), jnp.array([[3], [1]])), shape=(5, 2))}
    >>> params, state = jadam.update_and_apply(tx, grads, tx.init(params), params)
    >>> params["table"][:, 0]
    Array([ 0.   , -0.001,  0.   , -0.001,  0.   ], dtype=float32)

  References:
    `torch.optim.SparseAdam
    <https://pytorch.org/docs/stable/generated/torch.optim.SparseAdam.html>`_.
  """
  _hparams.check_learning_rate(learning_rate)
  _hparams.check_hyperparameter("eps", eps, low=0.0, wide_dtype=True)
  return _registry.optimizer_chain(
    "jadam.sparse_adam",
    *torch_front(maximize, None),
    _sparse.scale_by_sparse_moments(b1, b2),
    _sparse.rowwise(bias_correct(into_step=True)),
    _sparse.rowwise(normalize(eps)),
    scale_by_lr(learning_rate),
    none_grads=True,  # a table without a gradient this step is left as it is, as torch does
  )


def adam8bit(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  eps_root: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  amsgrad: bool = False,
  maximize: bool = False,
  block_size: int = 256,
  min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  r""":func:`adam` with 8-bit block-wise quantized moments (bitsandbytes' `Adam8bit`).

  The same algorithm as :func:`adam`, with :math:`m` and :math:`v` stored as one
  uint8 code per value and one float32 scale per block of `block_size` values
  (:class:`jadam.Quantized`): about :math:`2 + 8/\text{block\_size}` bytes per
  parameter instead of 8. Each step dequantizes the moments, updates them in
  float32, takes the step from those float32 values and requantizes them for
  storage, in one fused pass under `jit`:

  .. math::
      m_t = \beta_1 \tilde m_{t-1} + (1-\beta_1) g_t, \quad
      v_t = \beta_2 \tilde v_{t-1} + (1-\beta_2) g_t^2, \quad
      \tilde m_t, \tilde v_t = Q(m_t), Q(v_t),

  with :math:`\hat m_t, \hat v_t` and the step as in :func:`adam`. Leaves with
  fewer than `min_8bit_size` elements (biases, norms) and complex leaves keep
  float32 moments: on them this is exactly :func:`adam`. `amsgrad` keeps its
  maximum in float32. See "8-bit moments" in the README for where 8 bits lose
  information and what that costs.

  Args:
    learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad, maximize: as
      in :func:`adam`.
    block_size: values per scale, a positive power of two.
    min_8bit_size: leaves with fewer elements keep float32 moments.

  Returns:
    An :class:`optax.GradientTransformation`. Under `optax.inject_hyperparams`
    name `block_size` and `min_8bit_size` in `static_args`.

  References:
    Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
    Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """
  spec = _quantize.Quantized(block_size=block_size, min_size=min_8bit_size)
  return _adam_chain(
    "jadam.adam8bit", learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad, maximize, spec, spec, decoupled=False
  )


def adamw8bit(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  eps_root: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 1e-2,
  amsgrad: bool = False,
  maximize: bool = False,
  mask: Mask = None,
  block_size: int = 256,
  min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
  r""":func:`adamw` with 8-bit block-wise quantized moments (bitsandbytes' `AdamW8bit`).

  .. math::
      \theta_t = \theta_{t-1} - \alpha_t \left(
          \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{\text{root}}} + \epsilon} + \lambda \theta_{t-1}\right),

  with the moments stored as in :func:`adam8bit`.

  Args:
    learning_rate, b1, b2, eps, eps_root, weight_decay, amsgrad, maximize, mask:
      as in :func:`adamw`.
    block_size: values per scale, a positive power of two.
    min_8bit_size: leaves with fewer elements keep float32 moments.

  Returns:
    An :class:`optax.GradientTransformation`.
  """
  spec = _quantize.Quantized(block_size=block_size, min_size=min_8bit_size)
  return _adam_chain(
    "jadam.adamw8bit",
    learning_rate,
    b1,
    b2,
    eps,
    eps_root,
    weight_decay,
    amsgrad,
    maximize,
    spec,
    spec,
    decoupled=True,
    mask=mask,
  )


# --- Adafactor and Muon --------------------------------------------------------------------------
def adafactor(
  learning_rate: optax.ScalarOrSchedule = 1e-2,
  beta2_decay: optax.ScalarOrSchedule = -0.8,
  eps: optax.ScalarOrSchedule | None = None,
  eps_scale: optax.ScalarOrSchedule = 1e-3,
  clipping_threshold: optax.ScalarOrSchedule = 1.0,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  maximize: bool = False,
) -> optax.GradientTransformation:
  r"""Adafactor, with the semantics and defaults of `torch.optim.Adafactor`.

  .. math::
      \begin{align*}
        g_t &\leftarrow \pm g_t && \text{(maximize)}\\
        \hat V_t &= \text{factored } (R_t C_t / \max(\bar R_t, \epsilon_1)) \text{ or full } V_t,
            \text{ decay } 1 - t^{\tau}, \text{ floored at } \epsilon_1^2
            && \text{(\texttt{scale\_by\_factored\_moments})}\\
        U_t &= g_t / \sqrt{\hat V_t}
            && \text{(\texttt{normalize(0)})}\\
        \hat U_t &= U_t / \max(1, \operatorname{RMS}(U_t) / d)
            && \text{(\texttt{clip\_by\_rms})}\\
        \theta_t &= \theta_{t-1}(1 - \alpha\lambda)
            - \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\,\min(\alpha, 1/\sqrt t)\, \hat U_t
            && \text{(\texttt{scale\_by\_param\_rms}, \texttt{scale\_by\_relative\_step}, \texttt{decoupled\_decay})}
      \end{align*}

  Matrices (and the last two axes of higher-rank parameters) keep only row
  and column averages of :math:`g^2`: :math:`m + n` numbers for an
  :math:`m \times n` weight instead of :math:`mn`. Vectors and scalars keep a
  full second moment. There is no first moment.

  Where it differs from `optax.adafactor` (which follows the paper and T5):
  :math:`\epsilon_1` is a floor (of the row factors' mean, and squared, of
  :math:`\hat V`), not added to :math:`g^2`, and defaults to the dtype's
  machine epsilon (Optax: 1e-30 added); the relative step is
  :math:`\min(\alpha, 1/\sqrt t)` with the learning rate :math:`\alpha`
  (Optax: the learning rate multiplies a separate decay schedule, and the
  paper caps at 0.01); the decay is :math:`1 - t^{\tau}` from :math:`t = 1`
  (Optax: :math:`1 - (t+1)^{-0.8}` with an offset); weight decay is PyTorch's
  decoupled :math:`\theta(1 - \alpha\lambda)` (Optax: added to the update
  after scaling, by `weight_decay_rate`); every parameter of two or more
  dimensions is factored (Optax: only where both of the two largest axes are
  at least `min_dim_size_to_factor` = 128, which may be other than the last
  two); there is no momentum option.

  Args:
    learning_rate: :math:`\alpha \ge 0`: the relative step's cap and the decay's rate.
    beta2_decay: :math:`\tau \le 0`.
    eps: :math:`\epsilon_1 \ge 0`, or None for each parameter dtype's machine epsilon
      (PyTorch's ``eps[0]``).
    eps_scale: :math:`\epsilon_2 \ge 0`, the floor of the parameters' RMS (PyTorch's ``eps[1]``).
    clipping_threshold: :math:`d \ge 1` (PyTorch's `d`).
    weight_decay: :math:`\lambda \ge 0`, decoupled.
    maximize: Ascend the objective instead.

  Returns:
    An :class:`optax.GradientTransformation`; its update needs `params`.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _hparams.check_hyperparameter("clipping_threshold", clipping_threshold, low=1.0)
  return _registry.optimizer_chain(
    "jadam.adafactor",
    *torch_front(maximize, None),
    _factored.scale_by_factored_moments(beta2_decay, eps=eps),
    normalize(0.0),
    _factored.clip_by_rms(clipping_threshold),
    _factored.scale_by_param_rms(eps_scale),
    _factored.scale_by_relative_step(learning_rate),
    decoupled_decay(weight_decay, learning_rate),
  )


def muon(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  momentum: optax.ScalarOrSchedule = 0.95,
  *,
  nesterov: bool = True,
  weight_decay: optax.ScalarOrSchedule = 0.1,
  ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
  ns_steps: int = 5,
  eps: optax.ScalarOrSchedule = 1e-7,
  adjust_lr_fn: str | None = "original",
  ns_dtype: Dtype | None = jax.numpy.bfloat16,
) -> optax.GradientTransformation:
  r"""Muon, with the semantics and defaults of `torch.optim.Muon`: for 2-D (hidden-layer) weights only.

  .. math::
      \begin{align*}
        B_t &= \mu B_{t-1} + (1 - \mu) g_t, \quad
        \tilde B_t = \begin{cases} (1-\mu) g_t + \mu B_t & \text{nesterov}\\ B_t \end{cases}
            && \text{(\texttt{momentum(ema=True)})}\\
        O_t &= \mathrm{NS}^{(a,b,c)}_k\bigl(\tilde B_t / \max(\lVert\tilde B_t\rVert_F, \epsilon)\bigr)
            && \text{(\texttt{orthogonalize})}\\
        \theta_t &= \theta_{t-1}(1 - \alpha\lambda) - \alpha\, s(A, B)\, O_t
            && \text{(\texttt{scale\_by\_lr}, \texttt{decoupled\_decay})}
      \end{align*}

  with :math:`s(A, B) = \sqrt{\max(1, A/B)}` (``adjust_lr_fn="original"``,
  Keller Jordan's) or :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``,
  Moonshot's, which lets Muon reuse AdamW's learning rate and decay). The
  momentum is PyTorch's code (an exponential moving average), not the sum
  :math:`\mu B + g` that its docstring writes; the Newton–Schulz iteration runs
  in bfloat16, as PyTorch's does (`ns_dtype`).

  Muon is for the hidden 2-D weights; the usual recipe gives everything else
  (biases, norms, embeddings, the output layer) AdamW::

      labels = lambda params: jax.tree.map_with_path(
          lambda path, p: "muon" if p.ndim == 2 and "head" not in jax.tree_util.keystr(path) else "adamw", params)
      tx = optax.partition({"muon": jadam.muon(0.02), "adamw": jadam.adamw(3e-4)}, labels)

  Args:
    learning_rate: :math:`\alpha \ge 0`.
    momentum: :math:`\mu \in [0, 1]`.
    nesterov: Nesterov's look-ahead (PyTorch's default True).
    weight_decay: :math:`\lambda \ge 0`, decoupled (PyTorch's default 0.1).
    ns_coefficients: :math:`(a, b, c)`.
    ns_steps: :math:`k < 100`.
    eps: :math:`\epsilon`, the floor of the Frobenius norm.
    adjust_lr_fn: ``"original"`` (PyTorch's default, also its None),
      ``"match_rms_adamw"``, or None here for no adjustment.
    ns_dtype: the dtype of the Newton–Schulz iteration (bfloat16 as PyTorch; None: the parameters').

  Returns:
    An :class:`optax.GradientTransformation`; its init refuses parameters that are not 2-D.

  References:
    Jordan et al., `Muon: An optimizer for hidden layers in neural networks
    <https://kellerjordan.github.io/posts/muon/>`_, 2024.
  """
  return _registry.optimizer_chain(
    "jadam.muon",
    _scale.momentum(momentum, nesterov=nesterov, ema=True),
    _orthogonal.orthogonalize(ns_coefficients, ns_steps, eps, shape_scaling=adjust_lr_fn, ns_dtype=ns_dtype),
    scale_by_lr(learning_rate),
    decoupled_decay(weight_decay, learning_rate),
  )
