import pytest
import torch

from pipeline.io import stage_io
from pipeline.io.stage_io import choose_data_path as choose
from pipeline.train.data_path import BatchSource
from pipeline.train.loop import batches

CPU = torch.device("cpu")


def test_auto_keeps_the_data_resident_only_while_it_fits_in_half_the_free_memory(tmp_path, monkeypatch):
    f = tmp_path / "dataset.safetensors"
    f.write_bytes(b"\0" * 1000)
    assert choose("auto", f, CPU) == "resident"  # 1 kB against this machine's real free memory
    monkeypatch.setattr(stage_io, "free_memory", lambda device: 1999)
    assert choose("auto", f, CPU) == "host"
    monkeypatch.setattr(stage_io, "free_memory", lambda device: 2000)
    assert choose("auto", f, CPU) == "resident"
    assert choose("host", f, CPU) == "host" and choose("resident", f, CPU) == "resident"


def test_host_batches_are_the_resident_batches_in_the_same_order():
    x, y = torch.randn(101, 1, 4, 4), torch.randint(0, 10, (101,))
    plan = list(batches(101, 16, torch.Generator().manual_seed(3), CPU))
    resident = list(BatchSource(x, y, CPU, "resident").epoch(plan))
    host = list(BatchSource(x, y, CPU, "host", workers=2).epoch(plan))
    assert len(host) == len(resident) == 7
    for (xr, yr), (xh, yh), idx in zip(resident, host, plan):
        assert torch.equal(xr, x[idx]) and torch.equal(xh, xr) and torch.equal(yh, yr)


def test_an_unknown_data_path_is_refused():
    with pytest.raises(ValueError, match="resident or host"):
        BatchSource(torch.zeros(2, 1), torch.zeros(2), CPU, "disk")
