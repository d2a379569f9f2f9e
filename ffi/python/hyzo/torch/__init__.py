"""PyTorch optimizers backed by libhyzo: :class:`ZO`, :class:`Hybrid` and :class:`FO`.

They follow ``torch.optim`` conventions (param groups, ``step(closure)``, ``zero_grad``,
``state_dict``/``load_state_dict``, ``torch.optim.lr_scheduler``), and update the parameters
in place, with no copies:

- CPU tensors run on hyzo's CPU backend, CUDA tensors on its GPU backend, on torch's
  current stream (losses are handed over as device pointers: no host synchronization);
- float32, float16 and bfloat16 parameters can be mixed in one model;
- each param group becomes one C optimizer (its "shard"); every parameter element has a
  *global offset* in the model's flat parameter vector (by default: the trainable
  parameters in order across all groups, from 0), which names the random direction entries
  it is perturbed with. A flat shard of a model split across processes (FSDP-style) is
  given its offset with the group key ``global_offset`` or :func:`set_global_offset`, so
  every rank perturbs its slice exactly as the unsharded model would be perturbed. Param
  groups may not overlap, in memory or in global offsets;
- with ``process_group``, the loss of every forward pass is all-reduced (mean) over the
  group: one scalar per forward, no gradient traffic for zeroth-order steps.

Frozen parameters are left alone, as in ``torch.optim``: a parameter with
``requires_grad=False`` is never perturbed nor updated (nor validated) by any of the three
optimizers, and takes no room in the default global offsets (so passing
``model.parameters()`` perturbs the trainable ones exactly as passing only those would).
The set of trainable parameters is read at construction; it may change until the first step
(the optimizer then registers the new set), not after. In :class:`FO`, a parameter whose
``.grad`` is ``None`` at ``step()`` is skipped as ``torch.optim.AdamW`` skips it: not
updated, no weight decay, its moments untouched.

The closure of :class:`ZO` and :class:`Hybrid` only computes and returns the loss; the
optimizer runs it under ``torch.no_grad()`` for zeroth-order evaluations, and with grad
enabled followed by ``loss.backward()`` (called by the optimizer) for first-order steps.
:class:`FO` is a drop-in ``torch.optim.AdamW``-style optimizer: the user calls
``backward()`` as usual, then ``step()``.

Options per group (each group's C optimizer has its own): ``lr``, ``weight_decay``,
``rule`` (``fo_rule``, ``zo_rule``, ``zo_lr_ratio``, ``zo_weight_decay`` in :class:`Hybrid`),
``betas``, ``adam_eps``, ``precision``, ``hybrid_alpha`` (:class:`Hybrid`; 0 in :class:`ZO`),
``global_offset``. Options shared by all groups (they define the perturbation, its schedule
and seed, which must be one for the whole model: the groups step in lockstep), refused
when groups differ: ``eps``, ``directions``, ``num_directions``, ``estimator``, ``seed``,
``fo_steps``, ``zo_steps``, ``rank``. :class:`FO` has torch.optim.AdamW's keys instead
(``lr``, ``betas``, ``eps`` = Adam's epsilon, ``weight_decay``, plus ``rule``, ``precision``,
``global_offset`` per group and ``seed`` shared). A group is checked alike wherever it comes
from: the constructor, :meth:`add_param_group` or :meth:`load_state_dict`.

Low-rank directions (``directions="lowrank", rank=r``, spec v3 §7): ``opt.attach(model)``
registers the 2-D weights of the model's ``nn.Linear`` and ``nn.Embedding`` modules that the
optimizer holds as matrices and puts a forward hook on those modules; during the forwards
of a zeroth-order step each hook adds ``c · x B_d A_dᵀ / sqrt(r)`` (``c · A_d[idx] B_dᵀ /
sqrt(r)`` for a lookup) to the module's output, in f32, so those weights stay bit for bit
unchanged until the update writes them once. The other parameters take the written
Gaussian. Only weights whose every use is a hooked module's forward may be low-rank (see
:meth:`ZO.attach`; ``exclude`` opts weights out).

Threads: an optimizer is used by one thread at a time (a call into the library while
another thread is inside one on the same optimizer raises :class:`hyzo.BadStateError`);
distinct optimizers may step concurrently on different threads.
"""

# The package's rooms: _optimizer (the machinery ZO, Hybrid and FO share), _options (a
# group's options and their checks), _registration (which tensors each group registers,
# and its C optimizer), _protocol (a zeroth-order step across groups and processes),
# _gradients (first-order steps' gradient buffers), _lowrank (forward hooks), _checkpoint
# (hyzo's part of a state dict), and one module per public optimizer.

from ._fo import FO
from ._hybrid import Hybrid
from ._registration import Shard, set_global_offset
from ._zo import ZO

__all__ = ["ZO", "Hybrid", "FO", "set_global_offset", "Shard"]

# The public names are hyzo.torch's, wherever they are defined: what help(), pickles of the
# classes and error messages show, and what stays put when the rooms move.
for _obj in (ZO, Hybrid, FO, set_global_offset, Shard):
    _obj.__module__ = __name__
del _obj
