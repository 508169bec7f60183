"""QuantizedLinear and quantize_model: swap nn.Linear layers for weight-only int8/int4 ones.

Nothing here knows about GLM blocks beyond the default names to quantize; the model code never imports this
module's internals.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from .format import check_bits, packed_in_features, quantize_weight
from .kernels import select_kernel

__all__ = ["QuantizedLinear", "quantize_model", "DEFAULT_TARGETS", "default_module_filter"]

# The four Linear layers of every GLM block that the original quantizes (both generations).
DEFAULT_TARGETS = frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored in the official int8/int4 layout.

    Parameters (all ``requires_grad=False``; the names and shapes are the checkpoint's):
      * ``weight``: int8 ``[out_features, in_features * bits // 8]``;
      * ``weight_scale``: ``[out_features]`` in the model dtype;
      * ``bias``: ``[out_features]`` in the model dtype, or None.

    ``QuantizedLinear(in_features, out_features, bits, bias=True, dtype=None, device=None)`` builds an empty
    module (``device="meta"`` is fine) for a pre-quantized checkpoint; ``from_linear`` quantizes an existing
    ``nn.Linear``; ``load_float_weight`` quantizes a float tensor into the module (quantize-on-load).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        dtype = dtype or torch.get_default_dtype()
        packed = packed_in_features(self.in_features, self.bits)
        self.weight = nn.Parameter(torch.empty(self.out_features, packed, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device),
                                         requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # Derived, kernel-specific data (fp32 copies of scale/bias, repacked weights). Plain attributes, not
        # buffers, so state_dict() always holds exactly the official tensors. Entries are keyed by the
        # identity and version of the tensors they came from and rebuilt when those change.
        self._kernel_cache: dict[str, tuple[tuple, tuple, object]] = {}

    # ---------------------------------------------------------------------------------------------- builders

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize ``linear`` (its weight dtype becomes the scale/bias dtype; same device)."""
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                     dtype=w.dtype, device="meta")
        if linear.bias is not None:
            module._set("bias", linear.bias.detach().clone())
        module.load_float_weight(w.detach())
        return module

    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float ``[out_features, in_features]`` weight into this module, in place.

        The quantization runs in the tensor's own dtype (fp16 for the official checkpoints, which reproduces
        the official int4/int8 tensors bit for bit) and on its device; the scale is then stored in this
        module's dtype. Works on a module created on the meta device.
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected a weight of shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        with torch.no_grad():
            q, scale = quantize_weight(weight, self.bits)
        self._set("weight", q)
        self._set("weight_scale", scale.to(self.weight_scale.dtype))
        self.post_load()

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        # Replace the Parameter object (not copy into it): the module may live on the meta device.
        self._parameters[name] = nn.Parameter(tensor, requires_grad=False)

    def post_load(self) -> None:
        """Called by the loader once weight/weight_scale/bias are in place: validate and prepare kernel data.

        Optional: forward() prepares the same data lazily if this was never called.
        """
        expected = (self.out_features, packed_in_features(self.in_features, self.bits))
        if tuple(self.weight.shape) != expected or self.weight.dtype != torch.int8:
            raise ValueError(f"quantized weight must be int8 {expected}, got {self.weight.dtype} "
                             f"{tuple(self.weight.shape)}")
        if tuple(self.weight_scale.shape) != (self.out_features,):
            raise ValueError(f"weight_scale must have shape ({self.out_features},), got "
                             f"{tuple(self.weight_scale.shape)}")
        self._kernel_cache.clear()
        if all(t.device.type != "meta" for t in self.parameters()):
            self._f32_scale_and_bias()

    # ------------------------------------------------------------------------------------------------ kernels

    def cached(self, name: str, sources: tuple[torch.Tensor | None, ...], build: Callable[[], object]) -> object:
        """``build()``'s result, rebuilt whenever one of ``sources`` was replaced or modified in place.

        Tensors are recognised by object identity (a weak reference, so a new tensor that happens to reuse a
        freed address is not mistaken for the old one) plus their in-place version counter.
        """
        entry = self._kernel_cache.get(name)
        if entry is not None:
            refs, versions, value = entry
            if all((r is None and t is None) or (r is not None and t is not None and r() is t)
                   for r, t in zip(refs, sources)) and versions == tuple(
                       None if t is None else t._version for t in sources):
                return value
        value = build()
        refs = tuple(None if t is None else weakref.ref(t) for t in sources)
        self._kernel_cache[name] = (refs, tuple(None if t is None else t._version for t in sources), value)
        return value

    def _f32_scale_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 contiguous scale and bias on the weight's device (cached; the kernels take fp32)."""
        s, b = self.weight_scale, self.bias

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            return (s.detach().to(torch.float32).contiguous(),
                    None if b is None else b.detach().to(device=s.device, dtype=torch.float32).contiguous())

        return self.cached("f32", (s, b), build)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dimension {self.in_features}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        y = select_kernel(self, x2)(self, x2)
        return y.reshape(*lead, self.out_features)

    def __getstate__(self) -> dict:
        # Derived kernel data holds weak references, which cannot be pickled or deep-copied; it is rebuilt.
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}, dtype={self.weight_scale.dtype}")

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Module.to(dtype)/.half() leave the int8 weight alone (integer tensors are never cast) and convert
        # scale and bias, which is what we want; derived kernel data is dropped after any move or cast.
        out = super()._apply(fn, recurse)
        self._kernel_cache.clear()
        return out


def default_module_filter(name: str, module: nn.Module) -> bool:
    """The original's choice: the four Linear layers of each transformer block (a name under ``.layers.``)."""
    return name.rsplit(".", 1)[-1] in DEFAULT_TARGETS and ".layers." in f".{name}."


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    module_filter: Callable[[str, nn.Module], bool] | None = None,
    empty_init: bool = False,
) -> nn.Module:
    """Replace the selected ``nn.Linear`` submodules of ``model`` by QuantizedLinear, in place; returns model.

    ``module_filter(name, module)`` picks the layers (default: :func:`default_module_filter`). With
    ``empty_init=True`` nothing is quantized: empty modules are created (on the meta device when the Linear is
    there) for a pre-quantized checkpoint to be loaded into. Each float weight is released as soon as its
    layer is swapped, so peak memory grows by one layer, not by a model.
    """
    bits = check_bits(bits)
    keep = module_filter or default_module_filter
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and keep(name, mod)]
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear) and keep(name, mod) and mod.bits != bits:
            raise ValueError(f"{name} is already quantized to {mod.bits} bits; load the float model to "
                             f"quantize it to {bits} bits")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if empty_init:
            new = QuantizedLinear(linear.in_features, linear.out_features, bits, bias=linear.bias is not None,
                                  dtype=linear.weight.dtype, device=linear.weight.device)
        else:
            new = QuantizedLinear.from_linear(linear, bits)
        setattr(parent, child, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_bit"):
        config.quantization_bit = bits  # so save_pretrained records the format of the saved weights
    return model
