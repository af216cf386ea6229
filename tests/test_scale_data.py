"""Data path at scale: the RecordIO index as one numpy array, and the trainer's loader through make_loader."""
from __future__ import annotations

import numpy as np
import pytest

from facedata import formats
from facedata.datasets import make_loader
from facekd.io import FacekdError


def test_read_idx_is_an_offset_array_by_key_with_gaps_marked(tmp_path):
    idx = tmp_path / "train.idx"
    idx.write_text("0\t0\n1\t24\n\n4\t96\n2\t48\n")
    index = formats.read_idx(idx)
    assert index.dtype == np.int64 and index.tolist() == [0, 24, 48, -1, 96]
    idx.write_text("0\t0\n1\t24\nbroken line\n")
    with pytest.raises(FacekdError, match=r"train.idx:3: not an 'index<TAB>offset' line: 'broken line'"):
        formats.read_idx(idx)
    idx.write_text("0\t0\n99999999999\t8\n")
    with pytest.raises(FacekdError, match="large gaps"):
        formats.read_idx(idx)


def test_recordio_dataset_reads_through_workers_with_the_array_index(tmp_path):
    from facedata.datasets import open_train_set

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 112, 112, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(5), 2)
    out = formats.write_recordio(tmp_path / "r", images, labels, image_format="png")
    ds = open_train_set(str(out))
    assert isinstance(ds.offsets, np.ndarray) and len(ds) == 10
    seen = {}
    for batch_images, batch_labels, idx in make_loader(ds, batch_sampler=[[0, 3], [9, 4, 1]], workers=2):
        for img, lab, i in zip(batch_images, batch_labels.tolist(), idx.tolist()):
            seen[i] = lab
            assert np.array_equal(img.permute(1, 2, 0).numpy(), images[i])  # png: lossless
    assert seen == {i: int(labels[i]) for i in (0, 3, 9, 4, 1)}


def test_embedding_centres_picks_the_first_images_of_each_class_like_a_per_class_scan():
    import torch
    from torch import nn

    from prune.run import embedding_centres

    class Labels(torch.utils.data.Dataset):
        def __init__(self):
            self.labels = np.random.default_rng(0).integers(0, 7, 90)
            self.num_classes = 7

        def __getitem__(self, i):
            return torch.full((3, 4, 4), i, dtype=torch.uint8), int(self.labels[i]), i

    class Mean(nn.Module):  # embedding = (image value, 1): the centre direction reveals the mean index picked
        embedding_dim, preprocessing = 2, {"mean": [0.0] * 3, "std": [1.0] * 3, "channel_order": "RGB",
                                           "input_size": [4, 4]}

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            v = x[:, 0, 0, 0]
            return torch.stack([v, torch.ones_like(v)], dim=1) + 0 * self.w

    ds = Labels()
    got = embedding_centres(Mean(), ds, per_class=3)
    for c in range(7):
        picks = np.flatnonzero(ds.labels == c)[:3]  # the per-class scan the sort replaced
        emb = torch.nn.functional.normalize(torch.tensor([[float(i), 1.0] for i in picks]), dim=1).sum(0)
        torch.testing.assert_close(got[c], torch.nn.functional.normalize(emb, dim=0))


def test_gpu_preset_counts_arcface_torch_epochs():
    from engine.presets import make_config

    cfg = make_config("gpu", num_images=5_179_510)  # MS1MV3
    assert (cfg.batch_size, cfg.lr) == (512, 0.1)
    assert cfg.steps == 20 * (5_179_510 // 512) == 202_320 and cfg.warmup_steps == 2 * 10_116
    short = make_config("gpu", num_images=5_179_510, steps=1000, batch_size=1024)
    assert (short.steps, short.warmup_steps) == (1000, 100)
    assert make_config("gpu", num_images=10_000, batch_size=1000).steps == 200
    assert make_config("gpu").steps == 20000  # size unknown (prune's fine-tune budget): the step fallback
