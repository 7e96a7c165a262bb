"""The A² value policy: keep in full precision the value tokens that attention reads most.

With attention fixed, a value error costs ``E‖δo‖² ≈ Σ_t p_t² E‖δv_t‖²``: a token's value error
weighs with its squared attention. When a block of ``block_size`` tokens is quantized, the policy
ranks its tokens by their mean ``p²`` over the query rows that read the block while it was still
exact (rows at slots before the block's last slot, see the attention module), and keeps the
top ``value_keep`` tokens per KV head in the model dtype beside their codes. Reads overwrite the
dequantized values of kept tokens.

The choice depends only on those rows, which a token-by-token decode and a
one-forward prefill both see before the block is first read quantized: the choice is decode-exact.
``"position"`` (keep the first tokens of each block, same bytes) is the control for the choice.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import HeadQConfig
from .store import TokenBuffer


class KeptValues:
    """Full-precision values of the chosen tokens of each quantized block, and the window ``Σ p²``."""

    def __init__(self, config: HeadQConfig, template: torch.Tensor) -> None:
        """``template`` is a ``[B, H, *, D]`` value tensor giving batch, heads, dtype and device."""
        self.keep = config.value_keep
        self.block = config.block_size
        self.by_attention = config.value_policy == "a2"
        batch, heads = template.shape[:2]
        self.offsets = TokenBuffer(torch.zeros(batch, heads, 0, dtype=torch.int16, device=template.device))
        self.values = TokenBuffer(template[:, :, :0])
        # Σ p² per window token (float32): what the ranking needs; the position control needs none.
        self.window_mass = _filled(torch.zeros(batch, heads, 0, device=template.device)) if self.by_attention else None
        self.pending: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------ window
    def grow_window(self, tokens: int) -> None:
        if self.window_mass is not None:
            batch, heads = self.window_mass.data.shape[:2]
            self.window_mass.append(torch.zeros(batch, heads, tokens, device=self.window_mass.data.device))

    def hold(self, start: int, values: torch.Tensor) -> None:
        """Blocks ``values`` (dense, starting at slot ``start``) were just quantized: rank them later."""
        n = values.shape[2]
        if self.window_mass is None:
            self.pending = (start, values, values.new_zeros(0))
            return
        mass = self.window_mass.data[:, :, :n].clone()
        self.window_mass = _filled(self.window_mass.data[:, :, n:].clone())
        self.pending = (start, values, mass)

    @property
    def pending_range(self) -> tuple[int, int] | None:
        if self.pending is None:
            return None
        start, values, _ = self.pending
        return start, start + values.shape[2]

    # ---------------------------------------------------------- decision
    def choose(self, extra_mass: torch.Tensor | None = None) -> None:
        """Pick the kept tokens of the pending blocks (``extra_mass``: this call's rows' ``Σ p²``)."""
        if self.pending is None:
            return
        start, values, mass = self.pending
        self.pending = None
        batch, heads, n, dim = values.shape
        blocks = n // self.block
        if self.by_attention:
            if extra_mass is not None:
                mass = mass + extra_mass
            slots = start + torch.arange(n, device=mass.device)
            block_last = (slots // self.block + 1) * self.block - 1
            # query slots in [t, block's last slot) read token t exactly; the last token has no such reader
            readers = (block_last - slots).clamp_min(1).float()
            score = (mass / readers).reshape(batch, heads, blocks, self.block)
            top = score.topk(self.keep, dim=-1).indices.sort(dim=-1).values
        else:
            top = torch.arange(self.keep, device=values.device).expand(batch, heads, blocks, self.keep)
        grouped = values.reshape(batch, heads, blocks, self.block, dim)
        kept = torch.gather(grouped, 3, top[..., None].expand(-1, -1, -1, -1, dim))
        self.offsets.append(top.reshape(batch, heads, -1).to(torch.int16))
        self.values.append(kept.reshape(batch, heads, -1, dim))

    # -------------------------------------------------------------- reads
    def apply(self, values: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Overwrite kept tokens in dequantized values ``[B, H, end - start, D]`` of slots ``[start, end)``."""
        first_block, last_block = start // self.block, min(-(-end // self.block), self.offsets.length // self.keep)
        if last_block <= first_block:
            return values
        lo, hi = first_block * self.keep, last_block * self.keep
        offsets = self.offsets.data[:, :, lo:hi].long()
        blocks = torch.arange(first_block, last_block, device=values.device).repeat_interleave(self.keep)
        rel = blocks * self.block + offsets - start
        inside = (rel >= 0) & (rel < end - start)
        batch, heads, _, dim = values.shape
        b_idx, h_idx, k_idx = inside.nonzero(as_tuple=True)
        out = values.clone()
        out[b_idx, h_idx, rel[b_idx, h_idx, k_idx]] = self.values.data[:, :, lo:hi][b_idx, h_idx, k_idx].to(out.dtype)
        return out

    # ------------------------------------------------------------ upkeep
    def truncate(self, quantized_length: int, window_length: int) -> None:
        """After a crop to ``quantized_length`` + ``window_length`` tokens.

        Whole blocks below ``quantized_length`` stay. Window tokens that come back from a quantized
        block start with no mass (their readers were dropped with the crop).
        """
        self.choose()
        kept_entries = (quantized_length // self.block) * self.keep
        back_from_blocks = kept_entries < self.offsets.length
        self.offsets.truncate(kept_entries)
        self.values.truncate(kept_entries)
        if self.window_mass is not None:
            mass = self.window_mass.data[:, :, : 0 if back_from_blocks else window_length].clone()
            self.window_mass = _filled(mass)
            self.grow_window(window_length - mass.shape[2])

    def drop_front_blocks(self, blocks: int) -> None:
        """Forget the kept tokens of the oldest ``blocks`` quantized blocks (sliding-window eviction)."""
        self.choose()
        self.offsets.drop_front(blocks * self.keep)
        self.values.drop_front(blocks * self.keep)

    def map_batch(self, fn: Any) -> None:
        self.choose()
        for buf in self.buffers():
            buf.map_batch(fn)

    def buffers(self) -> list[TokenBuffer]:
        return [self.offsets, self.values] + ([self.window_mass] if self.window_mass is not None else [])


def _filled(rows: torch.Tensor) -> TokenBuffer:
    """A buffer holding ``rows``."""
    buf = TokenBuffer(rows)
    buf.append(rows)
    return buf
