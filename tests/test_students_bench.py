"""students.bench compares like with like: both memory layouts start from the same weights and compute the same step."""
from __future__ import annotations

import pytest
import torch

from students import bench


def test_layouts_compute_the_same_training_step():
    torch.manual_seed(0)
    nchw = bench._setup("mobilefacenet", 2, channels_last=False)
    torch.manual_seed(0)
    nhwc = bench._setup("mobilefacenet", 2, channels_last=True)
    assert nhwc[2].is_contiguous(memory_format=torch.channels_last) and nchw[2].is_contiguous()
    nhwc[2].copy_(nchw[2])
    for model, opt, x in (nchw, nhwc):
        bench._step(model, opt, x)
    for (name, a), b in zip(nchw[0].state_dict().items(), nhwc[0].state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--models", "mobilefacenet", "--steps", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --batch, --threads and --steps must be >= 1, --warmup >= 0"
