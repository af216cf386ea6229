"""prune: structured channel pruning of face students (Torch-Pruning) with KD fine-tuning.

    python -m prune.run runs/NAME/student --target-macs 150M     # prune, fine-tune, save, export, measure
    python -m prune.bench runs/NAME/student --ratio 0.2            # latency of unpruned vs round_to 8 vs 1

Library: `prune.core` (`PruneConfig`, `ChannelPruner`, `prune_model`, `search_ratio`, `protected_layers`).
"""
