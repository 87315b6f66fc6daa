"""``LitEma``: an exponential moving average of a model's trainable parameters, kept as module buffers.

The state-dict layout is ldm's, so EMA weights load from and into SD checkpoints (``model_ema.*`` keys):
buffers ``decay`` (float32 scalar), ``num_updates`` (int32 scalar) and one shadow buffer per trainable
parameter, named by deleting every ``.`` from the parameter name (COMPAT: ldm's mangling, e.g.
``diffusion_model.input_blocks.0.0.weight`` -> ``diffusion_modelinput_blocks00weight``).

Update rule (one call of ``forward`` per optimizer step)::

    n += 1;  d = min(decay, (1 + n) / (10 + n));  shadow -= (1 - d) * (shadow - param)

The warm-up term makes early updates fast (d = 0.18 at n = 1, 0.918 at n = 100) so the average forgets the
initial weights; ``num_updates = -1`` switches warm-up off. ``forward`` does this with one fused
``torch._foreach_lerp_`` over all tensors and without host-device synchronisation; ``update_reference`` is
the plain per-tensor loop, kept as the readable definition and for tests.

Left out on purpose: EMA sharding/offloading schedules (a caller can move the module to another device;
parameters are converted to the shadow's device and dtype on update) and delayed EMA start.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ldm.compat import ema_buffer_name


class LitEma(nn.Module):
    """EMA shadow copy of ``model``'s trainable parameters.

    Args:
        model: The module to track; its parameters with ``requires_grad`` get a shadow buffer initialised to
            their current values. Later calls must pass a module with the same trainable parameter names.
        decay: Target decay in [0, 1] (ldm and SD2: 0.9999).
        use_num_upates: Use the ``(1 + n) / (10 + n)`` warm-up. COMPAT: the keyword keeps ldm's misspelling
            ("upates") so existing calls and configs keep working.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int32))
        # ldm's attribute name: parameter name -> shadow buffer name.
        self.m_name2s_name: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = ema_buffer_name(name)
                if s_name in self.m_name2s_name.values():
                    raise ValueError(f"parameter names collide once dots are removed: {s_name!r}")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow buffers, matching parameters) in a fixed order; checks the model matches."""
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if params.keys() != self.m_name2s_name.keys():
            missing = sorted(self.m_name2s_name.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.m_name2s_name.keys())[:5]
            raise ValueError(
                "the model's trainable parameters differ from the ones this LitEma was built on "
                f"(first missing: {missing}, first new: {extra})"
            )
        names = list(self.m_name2s_name)
        shadows = [self._buffers[self.m_name2s_name[n]] for n in names]
        return shadows, [params[n].detach() for n in names]

    def _step_weight(self) -> torch.Tensor:
        """Advance ``num_updates`` (unless it is -1) and return ``1 - decay_eff`` as a float32 tensor."""
        warmup = self.num_updates >= 0
        self.num_updates += warmup.to(torch.int32)  # in place: the buffer keeps its identity and dtype
        n = self.num_updates.float()
        decay = torch.where(warmup, torch.minimum(self.decay, (1 + n) / (10 + n)), self.decay)
        return 1.0 - decay

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from ``model``'s current parameters (fused, no device synchronisation)."""
        shadows, params = self._pairs(model)
        weight = self._step_weight()
        # Parameters in another dtype/device than their shadow (e.g. a float32 EMA of bf16 weights, or an
        # EMA kept on the CPU) are converted first; `.to` is a no-op in the common case.
        params = [p.to(device=s.device, dtype=s.dtype) for s, p in zip(shadows, params)]
        # shadow - (1 - d) * (shadow - param) == lerp(shadow, param, 1 - d), in place and without temporaries.
        torch._foreach_lerp_(shadows, params, weight)

    @torch.no_grad()
    def update_reference(self, model: nn.Module) -> None:
        """The same update as ``forward``, one tensor at a time, written as in the formula."""
        shadows, params = self._pairs(model)
        one_minus_decay = self._step_weight()
        for shadow, param in zip(shadows, params):
            shadow.sub_(one_minus_decay * (shadow - param.to(shadow.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s trainable parameters with the EMA values."""
        shadows, params = self._pairs(model)
        for shadow, param in zip(shadows, params):
            param.copy_(shadow)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save a copy of ``parameters`` (e.g. before ``copy_to``) for a later ``restore``."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the values saved by ``store`` back into ``parameters`` (same order)."""
        parameters = list(parameters)
        if len(parameters) != len(self.collected_params):
            raise ValueError(f"restore got {len(parameters)} parameters but store saved {len(self.collected_params)}")
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)

    def reset_num_updates(self) -> None:
        """Restart the warm-up (n = 0), e.g. after loading weights into a fresh EMA."""
        self.num_updates.zero_()
