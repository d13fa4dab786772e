"""Row shards (lenx/step.py): a step split by rows over threads gives the whole batch's loss and gradients."""

import json
from contextlib import nullcontext

import pytest
import torch

from lenx.cli import main
from lenx.step import cpu_shards, forward_backward

from .conftest import tiny_model

SCHEMES = ["nope", "rope", "alibi", "t5", "shaw", "fire", "learned", "xpos", "kerple-log"]


def _grads(model, batch, shards, weight=1.0, start=None):
    model.zero_grad(set_to_none=True)
    if start is not None:  # gradients already there (an earlier micro-batch): the step adds to them
        for p, g in zip(model.parameters(), start):
            p.grad = g.clone()
    loss = forward_backward(model, batch, nullcontext, weight, shards)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("pe", SCHEMES)
def test_row_shards_give_the_whole_batch_loss_and_gradients(pe):
    model = tiny_model(pe).train()
    batch = torch.randint(0, 64, (5, 17), generator=torch.Generator().manual_seed(1))
    whole_loss, whole = _grads(model, batch, 1, weight=0.5)
    for shards in (2, 3, 5):  # 5 rows in 3 shards: 2, 2 and 1, weighted by their share of the rows
        loss, grads = _grads(model, batch, shards, weight=0.5)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=1e-6)
        for g, w in zip(grads, whole):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_row_shards_add_to_the_gradients_already_there():
    model = tiny_model("rope").train()
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    start = [torch.randn_like(p) for p in model.parameters()]
    _, whole = _grads(model, batch, 1, start=start)
    _, sharded = _grads(model, batch, 2, start=start)
    for g, w, s in zip(sharded, whole, start):
        assert not torch.equal(g, s)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_row_shards_give_the_same_numbers_every_time():
    """Gradients are summed in shard order, not in the order the threads finish."""
    model = tiny_model("alibi").train()
    batch = torch.randint(0, 64, (6, 17), generator=torch.Generator().manual_seed(3))
    first_loss, first = _grads(model, batch, 3)
    for _ in range(5):
        loss, grads = _grads(model, batch, 3)
        assert torch.equal(loss, first_loss)
        assert all(torch.equal(g, f) for g, f in zip(grads, first))


def test_row_shards_keep_the_callers_thread_count_and_autocast():
    seen = []

    class Net(torch.nn.Module):  # records what each shard's thread runs with
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("rope").train()

        def forward(self, ids):
            seen.append((torch.get_num_threads(), torch.is_autocast_enabled("cpu")))
            return self.inner(ids)

    before = torch.get_num_threads()
    batch = torch.randint(0, 64, (4, 17))
    forward_backward(Net(), batch, lambda: torch.autocast("cpu", dtype=torch.bfloat16), shards=2)
    assert torch.get_num_threads() == before
    assert seen == [(max(1, before // 2), True)] * 2  # autocast is per thread: each shard enters its own


def test_cpu_shards_one_per_thread_on_the_cpu_only():
    threads = torch.get_num_threads()
    assert cpu_shards("cpu", 8) == min(threads, 8)
    assert cpu_shards("cpu", 1) == 1
    assert cpu_shards("cuda", 8) == 1
    assert cpu_shards("cuda:0", 8) == 1
    assert cpu_shards("cpu", 8, distributed=True) == 1  # DDP's hooks expect one backward per step
    assert cpu_shards("cpu", 8, compiled=True) == 1


def test_rope_tables_are_safe_to_build_from_threads_at_once():
    """RoPE caches its cos/sin table; shards read and replace it from several threads (no KeyError, one answer)."""
    from concurrent.futures import ThreadPoolExecutor

    scheme = tiny_model("rope").pe
    want = torch.stack(scheme._cos_sin_at(torch.arange(40), 40), -1)

    def read(n):
        pos = torch.arange(n)
        return n, scheme.rotation(pos)

    with ThreadPoolExecutor(4) as pool:
        for n, rot in pool.map(read, [10, 40, 20, 40, 30] * 20):
            torch.testing.assert_close(rot, want[:n])


def test_train_records_its_row_shards(tmp_path, text_dataset):
    out = tmp_path / "run"
    assert main(["train", "--pe", "rope", "--dataset", str(text_dataset), "--steps", "2", "--batch-size", "4",
                 "--train-len", "16", "--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64",
                 "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["cpu_shards"] == min(torch.get_num_threads(), 4)
