"""The fast UNet step that `compile=True` compiles: the UNet as one call of tensors, with the time embeddings of
all steps made before the loop and the text's cross-attention keys and values made once per image.

Eager sampling calls diffusers' own UNet forward; this module is only used behind compile=True.
"""

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from brushwork.errors import BrushworkError


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * d] -> [B, heads, T, d]"""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _project_text(attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of cross-attention `attn` for `text`, split into heads."""
    if attn.fused_projections:
        key, value = attn.to_kv(text).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(text), attn.to_v(text)
    return _split_heads(key, attn.heads), _split_heads(value, attn.heads)


class TextKVAttnProcessor:
    """Attention as diffusers' AttnProcessor2_0 computes it in SD UNets, except that cross-attention takes the
    keys and values of the text ready-made (in `text_kv`, at `index`): the text is the same at every sampling
    step, so they are projected once per image instead of once per step (8-13% of a compiled UNet call here).
    Written by hand because diffusers has no processor that takes precomputed keys and values."""

    def __init__(self, index: int | None):
        self.index = index

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 text_kv: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("TextKVAttnProcessor does not take attention masks")
        if encoder_hidden_states is None:
            if attn.fused_projections:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            key, value = _split_heads(key, attn.heads), _split_heads(value, attn.heads)
        elif text_kv:
            query = attn.to_q(hidden_states)
            key, value = text_kv[2 * self.index], text_kv[2 * self.index + 1]
        else:  # the UNet called directly, without Denoiser
            query = attn.to_q(hidden_states)
            key, value = _project_text(attn, encoder_hidden_states)
        query = _split_heads(query, attn.heads)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _plain_attention(attn: Attention) -> bool:
    """Attention that TextKVAttnProcessor computes exactly as diffusers does (that of every SD 1.x/2.x UNet)."""
    return (type(attn.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0, TextKVAttnProcessor)
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_cross is None
            and attn.norm_q is None and attn.norm_k is None and not attn.residual_connection
            and attn.rescale_output_factor == 1.0)


def _unsupported_conditioning(unet: UNet2DConditionModel) -> str | None:
    """What this UNet needs beyond latents, timestep and text (which is all a text-to-image pipeline gives)."""
    c = unet.config
    if c.class_embed_type is not None or c.num_class_embeds is not None:
        return "class labels"
    if c.addition_embed_type not in (None, "text"):
        return f"added conditions ({c.addition_embed_type})"
    if c.encoder_hid_dim_type is not None:
        return f"a projection of the text ({c.encoder_hid_dim_type})"
    return None


def check_text_only_unet(unet: UNet2DConditionModel) -> None:
    """Refuse a UNet that needs more than latents, timestep and text."""
    unsupported = _unsupported_conditioning(unet)
    if unsupported is not None:
        raise BrushworkError(f"this UNet needs {unsupported}, which a text-to-image pipeline does not give; "
                             "brushwork runs Stable Diffusion 1.x/2.x-style UNets (text and timestep only).")


class Denoiser(torch.nn.Module):
    """The UNet as one call of tensors, the form CompiledModule takes: (latents, step_embedding, text, *text_kv).

    The time embedding of every step, and the pooled-text embedding that a UNet with addition_embed_type="text"
    adds to it, depend only on the timesteps and the text, so `step_embeddings` makes them for all steps at
    once, before the loop; `forward` is diffusers' UNet forward from there on (written out here because
    diffusers' takes only timesteps). `text_kv(text)` makes the cross-attention keys and values once per image;
    a UNet with attention TextKVAttnProcessor does not cover gets none and projects the text at every step."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        check_text_only_unet(unet)
        attentions = [m for m in unet.modules() if isinstance(m, Attention)]
        self.cross_attentions = [a for a in attentions if a.is_cross_attention]
        if not all(_plain_attention(a) for a in attentions):
            self.cross_attentions = []
            return
        for attn in attentions:
            index = self.cross_attentions.index(attn) if attn.is_cross_attention else None
            attn.set_processor(TextKVAttnProcessor(index))

    def text_kv(self, text: torch.Tensor) -> list[torch.Tensor]:
        # contiguous: compiled code is fixed to its inputs' strides
        return [tensor.contiguous() for attn in self.cross_attentions for tensor in _project_text(attn, text)]

    def step_embeddings(self, timesteps: torch.Tensor, text: torch.Tensor,
                        guidance: torch.Tensor | None = None) -> torch.Tensor:
        """[steps, B, C]: what the UNet's blocks take as `temb` at each step, for `text` [B, T, D] (and a few-step
        model's guidance embedding [B, time_cond_proj_dim], which joins the time embedding)."""
        unet = self.unet
        emb = unet.time_embedding(unet.time_proj(timesteps).to(text.dtype)[:, None], guidance)
        added = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs={})
        emb = (emb + added[None] if added is not None else emb.expand(-1, len(text), -1)).contiguous()
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    def forward(self, sample: torch.Tensor, step_embedding: torch.Tensor, text: torch.Tensor,
                *text_kv: torch.Tensor) -> torch.Tensor:
        kwargs = {"text_kv": text_kv} if text_kv else None
        unet = self.unet
        emb = step_embedding
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # diffusers passes the up blocks their output size only for sides that do not halve evenly
        uneven = any(side % 2 ** unet.num_upsamplers for side in sample.shape[-2:])
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, outputs = block(hidden_states=sample, temb=emb, encoder_hidden_states=text,
                                        cross_attention_kwargs=kwargs)
            else:
                sample, outputs = block(hidden_states=sample, temb=emb)
            skips += outputs
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
            else:
                sample = unet.mid_block(sample, emb)
        for block in unet.up_blocks:
            outputs, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = skips[-1].shape[2:] if uneven and skips else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=outputs,
                               encoder_hidden_states=text, cross_attention_kwargs=kwargs, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=outputs, upsample_size=size)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)
