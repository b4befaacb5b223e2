"""The typed settings of one fine-tuning trial: the knobs a search space names.

Ray Tune hands a trial a plain dict of the sampled knobs; the trial merges it
with the space's fixed values and validates it into :class:`TrialSettings` on
its first line. From there down, settings stay typed.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Target = Literal["attn", "mlp"]
Tower = Literal["image", "text"]


def split_parts(v):
    """Accept ``["attn", "mlp"]`` or ``"attn+mlp"``: Optuna's categorical choices must be scalars, so a list
    knob is searched as a ``+``-joined string and split back here, at the Tune boundary."""
    if isinstance(v, str):
        return [p for p in v.replace(",", "+").split("+") if p]
    return v


class TrialSettings(BaseModel):
    """Everything that defines one fine-tuning trial. Search-space ``params`` name these fields."""

    # A NaN or infinite knob (a fixed value, a choice, a range's end) is refused, as Ray Tune refuses infinite bounds
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    lora_rank: int = Field(4, ge=1, description="LoRA adapter rank r")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    lora_blocks: int = Field(1, ge=0, description="LoRA on the last K residual blocks of each chosen tower")
    lora_targets: list[Target] = Field(["attn", "mlp"], description="'attn' (in_proj+out_proj) and/or 'mlp'")
    lora_towers: list[Tower] = Field(["image", "text"], description="towers that get LoRA")
    train_projections: bool = Field(True, description="train visual.proj and text_projection")
    train_logit_scale: bool = Field(True, description="train the temperature")
    tether_weight: float = Field(0.0, ge=0, description="lambda of the MoCLIP tether: squared distance of the "
                                 "normalized embeddings to the frozen model's")
    data_fraction: float = Field(1.0, gt=0, le=1, description="nested share of the fine-tuning split")
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(64, ge=2, description="global batch (split across workers)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = Field(0, ge=0)

    @field_validator("lora_targets", "lora_towers", mode="before")
    @classmethod
    def _split_parts(cls, v):
        return split_parts(v)

    @model_validator(mode="after")
    def _something_trains(self):
        lora = self.lora_blocks > 0 and self.lora_targets and self.lora_towers
        if not (lora or self.train_projections or self.train_logit_scale):
            raise ValueError("nothing to train: enable LoRA (lora_blocks, lora_targets, lora_towers), "
                             "train_projections or train_logit_scale")
        return self
