"""Pre-training (and later SFT / RL / distillation) with one trainer loop: see docs/train.md.

    from nanoseek.train.trainer import TrainConfig, train
    from nanoseek.train.optim import Muon, build_optimizer, lr_schedule
    nanoseek train ... | nanoseek speedrun | nanoseek report RUN_DIR
"""
