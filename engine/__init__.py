"""engine: the one trainer (loop, DDP, AMP, EMA, checkpoint/resume, progress, JSONL log) and the margin heads.

    cfg = engine.make_config("cpu", out="runs/x/student")           # preset + overrides -> TrainConfig
    engine.Trainer(model, objective, dataset, cfg, val_sets).fit(resume=True)
"""
from engine.margin import MarginHead, MarginObjective
from engine.presets import PRESETS, make_config
from engine.trainer import TrainConfig, Trainer

__all__ = ["MarginHead", "MarginObjective", "PRESETS", "TrainConfig", "Trainer", "make_config"]
