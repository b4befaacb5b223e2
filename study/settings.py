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
#: how the last K blocks of the chosen towers train (study.library.alignment says which tensors each trains)
Method = Literal["lora", "full", "bitfit", "attention", "projections"]


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

    method: Method = Field("lora", description="what trains in the last K blocks: 'lora' (peft adapters on "
                           "lora_targets), 'full' (every weight), 'bitfit' (the biases, arXiv 2106.10199), "
                           "'attention' (the attention weights, no adapters), 'projections' (no block); the "
                           "projections and temperature train as train_projections/train_logit_scale say")
    learning_rate: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    lora_rank: int = Field(4, ge=1, description="LoRA adapter rank r")
    lora_alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    lora_blocks: int = Field(1, ge=0, description="K: the method trains the last K residual blocks of each chosen "
                             "tower (LoRA's name, kept for every method; ignored by 'projections')")
    lora_targets: list[Target] = Field(["attn", "mlp"], description="'attn' (in_proj+out_proj) and/or 'mlp'")
    lora_towers: list[Tower] = Field(["image", "text"], description="towers whose last K blocks train")
    train_projections: bool = Field(True, description="train visual.proj and text_projection")
    train_logit_scale: bool = Field(True, description="train the temperature")
    tether_weight: float = Field(0.0, ge=0, description="lambda of the MoCLIP tether: squared distance of the "
                                 "normalized embeddings to the frozen model's")
    data_fraction: float = Field(1.0, gt=0, le=1, description="nested share of the fine-tuning split")
    shots_per_class: Optional[int] = Field(None, ge=1, description="k-shot: k images of each class of the fine-tuning "
                                           "split (seeded, stratified, nested); needs labels; instead of data_fraction")
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(64, ge=2, description="global batch (split across workers)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = Field(0, ge=0)

    @field_validator("lora_targets", "lora_towers", mode="before")
    @classmethod
    def _split_parts(cls, v):
        return split_parts(v)

    @property
    def trained_blocks(self) -> int:
        """Residual blocks the method trains at the end of each tower in ``lora_towers``: ``lora_blocks``, or 0 for
        ``projections`` (and for LoRA without targets)."""
        if self.method == "projections" or (self.method == "lora" and not self.lora_targets) or not self.lora_towers:
            return 0
        return self.lora_blocks

    @model_validator(mode="after")
    def _one_subset_rule(self):
        if self.shots_per_class is not None and self.data_fraction != 1.0:
            raise ValueError("shots_per_class and data_fraction both choose the fine-tuning subset; set only one")
        return self

    @model_validator(mode="after")
    def _something_trains(self):
        if not (self.trained_blocks or self.train_projections or self.train_logit_scale):
            raise ValueError(f"nothing to train: method {self.method} trains no block here (lora_blocks, lora_towers"
                             f"{', lora_targets' if self.method == 'lora' else ''}), and neither train_projections "
                             f"nor train_logit_scale is on")
        return self
