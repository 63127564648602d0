"""``TrainerSettings``: the typed view of the config fields the Trainer reads, built once from the ConfigDict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class OptimSettings:
    """``config.optim`` as ``optim.make_optimizer`` reads it (values as given)."""

    learning_rate: float
    warmup_steps: int
    schedule: str
    grad_clip: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    adapter_weight_decay: float

    @classmethod
    def from_config(cls, optim: Any) -> "OptimSettings":
        """The fields of ``config.optim``."""
        return cls(**{name: optim[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TrainerSettings:
    """What the Trainer reads from a run config (``adapter``, ``train``, ``checkpoint``, ``optim``, seed, model path).

    ``method`` and the rank fields are kept as given: ``Trainer`` checks them and names the bad value.
    """

    method: str
    lora_rank: int
    r_max: int
    alpha: float
    initial_rank: int
    grow: bool
    rank_budget: int
    top_k: int
    growth_interval: int
    ema_beta1: float
    ema_beta2: float
    importance: str
    advance_learning: bool
    sync_every: int
    dropout: float
    init_std: float
    orth_reg: float
    slot_chunk_size: int
    remat: bool
    head_gradient: str
    classifier_dropout: float
    seed: int
    model_name_or_path: str
    log_every: int
    select_best: bool
    num_steps: int
    grad_accum_steps: int
    profile_start_step: int
    profile_num_steps: int
    checkpoint_every: int
    checkpoint_keep: int
    optim: OptimSettings
    # The running method's own adapter.<method>.* fields (empty for adapad, joint, lora).
    method_config: Mapping[str, Any] = field(default_factory=dict)
    # adapter.param_budget (0 = off); the Trainer converts it into rank_budget / lora_rank before the method is built.
    param_budget: int = 0

    @classmethod
    def from_config(cls, config: Any) -> "TrainerSettings":
        """Read the fields once; defaults for the ``train`` / ``model`` fields older configs may lack."""
        adapter, train = config.adapter, config.train
        return cls(
            method=adapter.method, lora_rank=adapter.lora_rank, r_max=adapter.r_max, alpha=float(adapter.alpha),
            initial_rank=adapter.initial_rank, grow=bool(adapter.grow), rank_budget=adapter.rank_budget,
            top_k=int(adapter.top_k), growth_interval=int(adapter.growth_interval),
            ema_beta1=float(adapter.ema_beta1), ema_beta2=float(adapter.ema_beta2), importance=adapter.importance,
            advance_learning=bool(adapter.advance_learning), sync_every=int(adapter.sync_every),
            dropout=float(adapter.dropout), init_std=float(adapter.init_std), orth_reg=float(adapter.orth_reg),
            slot_chunk_size=int(adapter.slot_chunk_size), remat=bool(adapter.remat),
            head_gradient=str(adapter.head_gradient),
            classifier_dropout=float(config.model.get("classifier_dropout", 0.0)), seed=int(config.seed),
            model_name_or_path=config.model.name_or_path,
            log_every=max(int(train.get("log_every_steps", 10)), 1),
            select_best=bool(train.get("select_best", False)),
            num_steps=max(int(train.get("num_steps", -1)), 1),
            grad_accum_steps=int(train.get("grad_accum_steps", 1)),
            profile_start_step=int(train.get("profile_start_step", 0)),
            profile_num_steps=int(train.get("profile_num_steps", 1)),
            checkpoint_every=int(config.checkpoint.every_steps), checkpoint_keep=int(config.checkpoint.keep),
            optim=OptimSettings.from_config(config.optim),
            method_config=(config.adapter[adapter.method].to_dict()
                           if adapter.method in adapter and hasattr(adapter[adapter.method], "to_dict") else {}),
            param_budget=int(adapter.get("param_budget", 0)),
        )
